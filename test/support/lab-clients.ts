// Real clients for the lab's failover tests, run inside a lab node (`ip netns exec NODE ...ARGV`). Each
// connects by name through the node's resolver (getaddrinfo: the hosts file, with the loopmesh block)
// and prints one JSON line, a ClientResult, timed inside the client itself (not the process start).

/** What one client did: whether it got its answer, how long it took, the address that answered. */
export interface ClientResult {
  ok: boolean;
  ms: number;
  peer?: string;
  detail: string;
}

export interface ClientKind {
  kind: string;
  /** The client tries every address of a name (so it fails over); false: it is only recorded. */
  triesEveryAddress: boolean;
  argv: string[];
}

const pythonSocket = (host: string, port: number, request: string, expect: string): string => `
import json, socket, time
t = time.monotonic()
try:
    s = socket.create_connection((${JSON.stringify(host)}, ${port}), timeout=5)
    peer = s.getpeername()[0]
    s.sendall(${JSON.stringify(request)}.encode())
    data = b""
    while ${JSON.stringify(expect)}.encode() not in data:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
    s.close()
    ok = ${JSON.stringify(expect)}.encode() in data
    print(json.dumps({"ok": ok, "ms": round((time.monotonic() - t) * 1000, 1), "peer": peer, "detail": data.decode(errors="replace").splitlines()[0] if data else "no answer"}))
except Exception as e:
    print(json.dumps({"ok": False, "ms": round((time.monotonic() - t) * 1000, 1), "detail": repr(e)}))
`;

const pythonRequests = (url: string): string => `
import json, time
import requests
t = time.monotonic()
try:
    r = requests.get(${JSON.stringify(url)}, timeout=5, stream=True)
    peer = r.raw._connection.sock.getpeername()[0] if r.raw._connection and r.raw._connection.sock else None
    body = r.text
    print(json.dumps({"ok": r.status_code == 200 and "hello from" in body, "ms": round((time.monotonic() - t) * 1000, 1), "peer": peer, "detail": body.strip()}))
except Exception as e:
    print(json.dumps({"ok": False, "ms": round((time.monotonic() - t) * 1000, 1), "detail": repr(e)[:300]}))
`;

const nodeNet = (host: string, port: number): string => `
const net = require('node:net');
const t = performance.now();
const out = (r) => { console.log(JSON.stringify({ ...r, ms: Math.round((performance.now() - t) * 10) / 10 })); process.exit(0); };
const s = net.connect({ host: ${JSON.stringify(host)}, port: ${port}, timeout: 5000 });
let data = '';
s.on('connect', () => s.write('GET / HTTP/1.1\\r\\nHost: ${host}\\r\\nConnection: close\\r\\n\\r\\n'));
s.on('data', (c) => { data += c; if (data.includes('hello from')) out({ ok: true, peer: s.remoteAddress, detail: data.split('\\r\\n')[0] }); });
s.on('timeout', () => out({ ok: false, detail: 'timeout' }));
s.on('error', (e) => out({ ok: false, detail: e.code + (e.errors ? ' ' + e.errors.map((x) => x.address + ':' + x.code).join(',') : '') }));
s.on('close', () => out({ ok: false, detail: 'closed: ' + data.slice(0, 100) }));
`;

const nodeFetch = (url: string): string => `
const t = performance.now();
const out = (r) => console.log(JSON.stringify({ ...r, ms: Math.round((performance.now() - t) * 10) / 10 }));
fetch(${JSON.stringify(url)}, { signal: AbortSignal.timeout(5000) })
  .then(async (r) => { const body = await r.text(); out({ ok: r.status === 200 && body.includes('hello from'), detail: body.trim() }); })
  .catch((e) => out({ ok: false, detail: String(e.cause?.code ?? e.cause?.message ?? e.message) }));
`;

/** curl: %{remote_ip} is the address that answered. */
export function curlArgv(url: string, maxTime = 5): string[] {
  return ['curl', '-s', '-o', '/dev/null', '--max-time', String(maxTime), '-w', '%{http_code} %{time_total} %{remote_ip}', url];
}

/** Every client kind, by name: HTTP to web.local:80, and redis-cli to redis.local:6379. */
export function clientKinds(): ClientKind[] {
  const shell = (script: string): string[] => ['bash', '-c', script];
  return [
    {
      kind: 'curl',
      triesEveryAddress: true,
      argv: shell(`out=$(${curlArgv('http://web.local/').map((a) => `'${a}'`).join(' ')}); rc=$?; set -- $out
        printf '{"ok":%s,"ms":%s,"peer":"%s","detail":"HTTP %s, exit %s"}\\n' "$([ "$1" = 200 ] && echo true || echo false)" "$(awk -v t="$2" 'BEGIN{printf "%.1f", t * 1000}')" "$3" "$1" "$rc"`),
    },
    { kind: 'python3 socket.create_connection', triesEveryAddress: true, argv: ['python3', '-c', pythonSocket('web.local', 80, 'GET / HTTP/1.0\r\nHost: web.local\r\n\r\n', 'hello from')] },
    { kind: 'python3 requests', triesEveryAddress: true, argv: ['python3', '-c', pythonRequests('http://web.local/')] },
    { kind: 'node net.connect', triesEveryAddress: true, argv: ['node', '-e', nodeNet('web.local', 80)] },
    { kind: 'node fetch', triesEveryAddress: true, argv: ['node', '-e', nodeFetch('http://web.local/')] },
    { kind: 'python3 socket to redis.local:6379 (PING)', triesEveryAddress: true, argv: ['python3', '-c', pythonSocket('redis.local', 6379, 'PING\r\n', '+PONG')] },
    {
      kind: 'redis-cli -h redis.local ping',
      triesEveryAddress: false,
      argv: shell(`t0=$(date +%s%N); out=$(redis-cli -h redis.local -p 6379 ping 2>&1); rc=$?; t1=$(date +%s%N)
        printf '{"ok":%s,"ms":%s,"detail":%s}\\n' "$([ "$out" = PONG ] && echo true || echo false)" "$(( (t1 - t0) / 1000000 ))" "$(printf '%s (exit %s)' "$out" "$rc" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')"`),
    },
  ];
}

/**
 * A bash loop: a new curl (new connection) to URL every `everyMs` for `seconds`, each line
 * "EPOCH_MS HTTP_CODE TIME_TOTAL REMOTE_IP EXIT" (HTTP_CODE 000 and EXIT > 0: failed).
 */
export function curlLoopArgv(url: string, seconds: number, everyMs = 50, maxTime = 2): string[] {
  const curl = curlArgv(url, maxTime).map((a) => `'${a}'`).join(' ');
  return [
    'bash',
    '-c',
    `end=$(( $(date +%s%N) / 1000000 + ${Math.round(seconds * 1000)} ))
     while [ $(( $(date +%s%N) / 1000000 )) -lt $end ]; do
       t=$(( $(date +%s%N) / 1000000 )); out=$(${curl}); rc=$?; echo "$t $out $rc"; sleep ${everyMs / 1000}
     done`,
  ];
}

export interface LoopRequest {
  at: number;
  code: string;
  seconds: number;
  peer: string;
  exit: number;
}

export function parseCurlLoop(stdout: string): LoopRequest[] {
  return stdout
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((line) => {
      const [at = '0', code = '000', seconds = '0', peer = '', exit = '0'] = line.trim().split(/\s+/);
      // A failed curl prints no remote IP: four fields, the last one the exit code.
      if (exit === '0' && !/\d+\.\d+\.\d+\.\d+/.test(peer)) return { at: Number(at), code, seconds: Number(seconds), peer: '', exit: Number(peer) || 0 };
      return { at: Number(at), code, seconds: Number(seconds), peer, exit: Number(exit) };
    });
}

/**
 * Holds one HTTP/1.1 keep-alive connection to URL's host by name (node's http, which tries every
 * address) and sends a request on it every `everyMs` for `ms`; prints
 * {"ok":N,"failed":N,"sockets":N,"peers":[...],"errors":{...}} at the end.
 */
export function holdArgv(url: string, ms: number, everyMs = 200): string[] {
  return [
    'node',
    '-e',
    `
const http = require('node:http');
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const sockets = new Set(); const peers = new Set(); const errors = {};
let ok = 0, failed = 0;
const get = () => new Promise((resolve) => {
  const req = http.get(${JSON.stringify(url)}, { agent, timeout: 3000 }, (res) => {
    sockets.add(res.socket); peers.add(res.socket.remoteAddress);
    let body = ''; res.on('data', (c) => (body += c));
    res.on('end', () => { if (res.statusCode === 200 && body.includes('hello from')) ok++; else failed++; resolve(); });
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', (e) => { failed++; errors[e.code ?? e.message] = (errors[e.code ?? e.message] ?? 0) + 1; resolve(); });
});
(async () => {
  const end = Date.now() + ${ms};
  while (Date.now() < end) { await get(); await new Promise((r) => setTimeout(r, ${everyMs})); }
  console.log(JSON.stringify({ ok, failed, sockets: sockets.size, peers: [...peers], errors }));
  process.exit(0);
})();
`,
  ];
}
