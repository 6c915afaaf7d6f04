#!/usr/bin/env bash
# Makes a `consul` binary available and prints its absolute path as the last line of output.
# Order: $CONSUL_BIN, a `consul` on PATH, the cache, else a build of a pinned release from the
# Go module proxy with the machine's Go into the cache (outside the repository).
set -euo pipefail

CONSUL_VERSION="${CONSUL_VERSION:-1.20.6}"
CACHE_ROOT="${LOOPMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loopmesh}"
TARGET_DIR="$CACHE_ROOT/consul-$CONSUL_VERSION"
TARGET="$TARGET_DIR/consul"

say() { printf 'install-consul: %s\n' "$*" >&2; }
die() { printf 'install-consul: error: %s\n' "$*" >&2; exit 1; }

works() { [ -x "$1" ] && "$1" version >/dev/null 2>&1; }

if [ -n "${CONSUL_BIN:-}" ]; then
  works "$CONSUL_BIN" || die "CONSUL_BIN=$CONSUL_BIN is not an executable consul binary (expected a path whose 'version' command runs)"
  say "using CONSUL_BIN"
  readlink -f "$CONSUL_BIN"
  exit 0
fi

if on_path=$(command -v consul 2>/dev/null) && works "$on_path"; then
  say "using consul from PATH"
  readlink -f "$on_path"
  exit 0
fi

if works "$TARGET"; then
  say "using cached build $TARGET"
  echo "$TARGET"
  exit 0
fi

GO="${GO:-$(command -v go || true)}"
[ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; }
[ -n "$GO" ] || die "no consul on PATH, no CONSUL_BIN, no cached build at $TARGET, and no Go toolchain to build one (install Go or set CONSUL_BIN)"

say "building Consul v$CONSUL_VERSION from the Go module proxy into $TARGET_DIR (this takes a few minutes)"
mkdir -p "$TARGET_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$GO" mod init loopmesh.local/consul-build >/dev/null 2>&1
# Consul's own go.mod excludes these; its exclude directives do not apply when it is a dependency.
cat >>go.mod <<MOD

exclude (
	github.com/hashicorp/go-msgpack v1.1.5
	github.com/hashicorp/go-msgpack v1.1.6
)
MOD
cat >tools.go <<'GO'
//go:build tools

package tools

import _ "github.com/hashicorp/consul"
GO
# The checksum database this machine reaches has no entries for some of HashiCorp's own
# modules (404), though the module proxy serves them; skip it for those modules only.
export GONOSUMDB="${GONOSUMDB:+$GONOSUMDB,}github.com/hashicorp/*"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
if ! "$GO" get "github.com/hashicorp/consul@v$CONSUL_VERSION" >"$work/get.log" 2>&1; then
  tail -20 "$work/get.log" >&2
  die "go get github.com/hashicorp/consul@v$CONSUL_VERSION failed (is the Go module proxy reachable? GOPROXY=$("$GO" env GOPROXY))"
fi
if ! CGO_ENABLED=0 "$GO" build -trimpath -o "$TARGET.tmp" \
    -ldflags "-s -w -X github.com/hashicorp/consul/version.GitCommit=loopmesh-build" \
    github.com/hashicorp/consul >"$work/build.log" 2>&1; then
  tail -20 "$work/build.log" >&2
  die "go build of Consul v$CONSUL_VERSION failed"
fi
mv -f "$TARGET.tmp" "$TARGET"
works "$TARGET" || die "the built binary $TARGET does not run"
say "built $("$TARGET" version | head -1)"
echo "$TARGET"
