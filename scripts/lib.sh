# Shared by the scripts: install what a step needs, from Debian's packages and npm, idempotently.

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# ensure_packages CMD:PACKAGE ... installs the Debian package of each missing command.
ensure_packages() {
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "missing packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}"
    return 1
  fi
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_node_modules: npm ci when node_modules is missing or older than the lockfile; builds dist/.
ensure_node_modules() {
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    log "npm ci"
    npm ci --no-audit --no-fund --loglevel=error >&2
  fi
  if [ ! -f dist/agent/cli/main.js ] || [ -n "$(find agent templates -newer dist/agent/cli/main.js -print -quit 2>/dev/null)" ]; then
    log "building (tsc)"
    npx tsc -p tsconfig.json >&2
  fi
}

# ensure_consul: exports CONSUL_BIN (builds Consul from the Go module proxy the first time).
ensure_consul() {
  CONSUL_BIN=$(bash scripts/install-consul.sh | tail -n 1)
  export CONSUL_BIN
}
