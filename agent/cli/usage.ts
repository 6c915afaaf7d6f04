import { settings } from '../config/config.js';

const flagLines = (): string =>
  settings
    .map((s) => {
      const left = `  --${s.flag}${s.value ? ` ${s.value}` : ''}`;
      const env = s.env.join(', ');
      return `${left.padEnd(34)} ${s.help}${s.default !== undefined ? ` (default ${s.default})` : ''}\n${''.padEnd(35)}env ${env}`;
    })
    .join('\n');

export const usage = {
  main: `loopmesh: a local-proxy service mesh driven by Consul

Usage: loopmesh COMMAND [flags]

Commands:
  agent      watch Consul, render configs, serve NAME.local on this node
  gateway    serve every service on addresses other nodes reach (the proxy cluster nodes fall back to)
  status     show the routes a running agent serves (service, name, address:port, backends)
  render     render the templates once from Consul's catalog; --dry-run prints instead of writing
  balancer   run only the data plane (balancer, DNS, hosts) from the files in --run-dir
  doctor     check this node: names resolve, data plane answers, Consul, token, run dir; says how to fix

Run 'loopmesh COMMAND --help' for a command's flags.
`,
  agent: () => `Usage: loopmesh agent [flags]

Watches Consul's catalog (healthy instances only), gives every service a stable 127.x.y.z address,
renders the templates into --run-dir, and serves NAME.SUFFIX:PORT with the built-in TCP balancer,
a DNS responder and a block in the hosts file. SIGUSR2 is a hot restart: a new process of the same
command line takes over every listening socket, then this one stops and drains.

Consul over TLS: an https:// --consul (or --consul-ssl) with --ca-file, --client-cert and --client-key,
as Consul's own CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY; never a fallback to plain HTTP.
The ACL token: --token-file or CONSUL_HTTP_TOKEN (a --token argument shows in the process list).

Flags (a flag beats the environment, which beats --config, which beats the default):
  --config FILE                      JSON file with the same settings, keys in camelCase
${flagLines()}
  --help                             this text
`,
  gateway: () => `Usage: loopmesh gateway --gateway-range CIDR [flags]

A member of the proxy cluster: the agent's control plane and data plane on a dedicated node, serving
every routed service on an address of --gateway-range (at the same offset as its loopback address in
--range, on the same port), reachable from the other nodes, balancing to the same healthy instances
with the same policies, passive health, limits and metrics. It registers itself in its local Consul
agent as --gateway-service (meta loopmesh-gateway-range), with an HTTP check every second on its
admin's /health/live (or --gateway-check), and deregisters on SIGTERM. Every node then lists each
service's gateway addresses after its loopback address in the hosts block (so a client that tries
each address reaches a gateway when the node's loopmesh is down) and uses them as the last resort
when no instance answers a direct connect. The addresses must be local to this host without being
on an interface, e.g. \`ip route add local 10.77.77.128/27 dev lo\` (needs root, once).
No DNS responder and no hosts block here. SIGUSR2 is a hot restart, as for the agent.

Flags (as the agent's, less --dns and --hosts-file):
  --config FILE                      JSON file with the same settings, keys in camelCase
${flagLines()}
  --help                             this text
`,
  doctor: `Usage: loopmesh doctor [flags]

Checks this node and prints one line per check (ok, warn or FAIL: what was seen) and a fix: line
for each problem. Exit status 0 when nothing fails (warnings allowed), 1 on a problem, 2 on a usage
error. It checks:
  admin       the agent's admin (--admin) answers /v1/routes; every route listens; /health's verdict
  names       each NAME.SUFFIX resolves through the system resolver (getaddrinfo) to its route's
              address first; if not, why: /etc/nsswitch.conf's hosts: line (mdns4_minimal
              [NOTFOUND=return] before files takes .local away; files missing), the hosts file's
              loopmesh block (missing, without the name, another address), /etc/resolv.conf
  data plane  a TCP connect to each route's address:port; who holds each port (ss), so another
              process on a route's port is named
  gateways    a TCP connect to each gateway of a route (warn when none answers)
  consul      --consul answers with a leader (TLS as the agent uses it); the token is valid
              (/v1/acl/token/self; "ACLs off" is fine) and may read the catalog and the KV
              PREFIX/addresses (and write it) and PREFIX/traffic/
  run dir     --run-dir exists, is this user's, not writable by group or others; balancer.json parses
Routes come from the admin's report, or from balancer.json when the admin is off or down.
Read-only: doctor changes nothing, in Consul or on disk.

Flags (as the agent's; a flag beats the environment, which beats --config):
  --config FILE, --consul URL, --consul-ssl, --ca-file FILE, --client-cert FILE, --client-key FILE,
  --tls-server-name NAME, --token-file FILE (or CONSUL_HTTP_TOKEN), --token TOKEN, --datacenter DC,
  --admin ADDR:PORT, --run-dir DIR, --hosts-file FILE|off, --suffix DOMAIN, --kv-prefix PREFIX,
  --range CIDR, --gateway-service NAME|off, --help
`,
  status: `Usage: loopmesh status [--admin ADDR:PORT] [--json]

Asks a running agent's admin HTTP (default 127.0.0.1:9190, env LOOPMESH_ADMIN) for its routes and
prints a table: service, name, address:port, healthy backends. --json prints the raw report.
`,
  render: () => `Usage: loopmesh render --dry-run [flags]

Reads Consul's catalog once, plans and renders every template, and prints each file that would be
written (addresses not yet allocated are shown as they would be allocated; nothing is written to
Consul or to disk). Takes the agent's flags.
  --dry-run                          print instead of write (required for now)
${flagLines()}
`,
  balancer: `Usage: loopmesh balancer [--run-dir DIR] [--dns ADDR:PORT|off] [--hosts-file FILE|off] [--suffix DOMAIN]
                         [--drain-timeout S] [--handover-timeout S] [--connect-timeout S] [--log-level LEVEL] [--config FILE]
                         [--admin ADDR:PORT [--admin-public]] [--workers N|auto] [--gateway-range CIDR]

Runs the data plane alone from the rendered files in --run-dir (balancer.json, hosts), reloading
when they change: a control plane crash or restart never drops traffic. Pair it with
'loopmesh agent --render-only' on the same --run-dir. SIGTERM closes the listeners and lets open
connections finish for up to --drain-timeout seconds. SIGUSR2 is a hot restart (after an upgrade):
a new process with the same command line takes over every listening socket and the current routes,
then this one stops accepting and drains, so no connection is refused; if the new process fails to
start, this one keeps serving.

--admin ADDR:PORT serves /health, /v1/routes and /metrics from this process with the live counters
(off unless given here; loopback only unless --admin-public). /health is 200 when every service of
the loaded balancer.json listens and the hosts block is fine, else 503 with the reasons.

--workers N|auto (env LOOPMESH_WORKERS; default 1, auto: one per CPU, at most 64) runs N worker
processes under a small supervisor. The supervisor binds every listening socket (services, DNS)
once and shares it with every worker, which all accept from the same kernel queue; it never
accepts itself. A worker that dies is replaced (with backoff if it keeps dying young) while the
others keep accepting. Each worker applies --max-connections and --queue on its own, so the limits
add up over the workers. Only worker 0 writes the hosts file. The admin runs in the supervisor and
sums the workers' counters (/v1/routes lists each worker: pid, alive, started); /health is 200 only
when all N workers serve and each is healthy. With workers, SIGUSR2 replaces the workers one by one
with new processes started from the code on disk (each new one serves before the old one drains);
the supervisor itself is not replaced: restart it (SIGTERM, then start) to upgrade it.

--gateway-range CIDR serves the run dir of 'loopmesh gateway --render-only' (a gateway in split
mode): services listen inside that range, with no DNS and no hosts block. Give the control plane
--gateway-check http://THIS_ADMIN/health/live so that Consul checks this process.
`,
};
