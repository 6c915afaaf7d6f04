// Runs inside a lab node (ip netns exec NODE node test/lab/load.mjs NAME PORT MS): HTTP load by name.
// - `keep` keep-alive connections opened at the start, each sending a request every 200 ms for the
//   whole run (the "open connections" that must finish);
// - a new connection every `every` ms, each resolving NAME through the node's resolver (getaddrinfo:
//   /etc/hosts, then DNS), one request, then closed.
// Prints one JSON line at the end: counts, failures by message, and the addresses NAME resolved to.
import http from 'node:http';
import { lookup } from 'node:dns/promises';

const [name, portArg, msArg, everyArg = '20', keepArg = '4'] = process.argv.slice(2);
const port = Number(portArg);
const durationMs = Number(msArg);
const every = Number(everyArg);
const keep = Number(keepArg);
const addresses = new Set();
const failures = {};
let newOk = 0;
let newFailed = 0;
let slow = 0;
const fail = (kind, err) => {
  const key = `${kind}: ${err.code ?? err.message}`;
  failures[key] = (failures[key] ?? 0) + 1;
};

function get(agent, host, timeout) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host, port, path: '/', agent, timeout, headers: { host: name } }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`HTTP ${res.statusCode}`))));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

const first = await lookup(name, { family: 4 });
addresses.add(first.address);

// Open connections: one socket each (maxSockets 1), reused for every request.
const kept = [];
for (let i = 0; i < keep; i++) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const state = { ok: 0, failed: 0, sockets: new Set() };
  agent.on('free', (socket) => state.sockets.add(socket));
  kept.push({ agent, state });
}
const end = Date.now() + durationMs;
const keptLoops = kept.map(async ({ agent, state }) => {
  while (Date.now() < end) {
    try {
      await get(agent, first.address, 3000);
      state.ok++;
    } catch (err) {
      state.failed++;
      fail('open connection', err);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
});

const inFlight = new Set();
while (Date.now() < end) {
  const p = (async () => {
    try {
      const { address } = await lookup(name, { family: 4 });
      addresses.add(address);
      const started = Date.now();
      // A new connection fails only when it is refused, reset or gets nothing for 10 s; one that is
      // merely slow (a CPU-starved CI machine during a hot restart) is counted apart, not as failed.
      await get(false, address, 10_000);
      if (Date.now() - started > 3000) slow++;
      newOk++;
    } catch (err) {
      newFailed++;
      fail('new connection', err);
    }
  })();
  inFlight.add(p);
  p.finally(() => inFlight.delete(p));
  await new Promise((r) => setTimeout(r, every));
}
await Promise.all([...inFlight, ...keptLoops]);
for (const { agent } of kept) agent.destroy();
process.stdout.write(
  `${JSON.stringify({
    newOk,
    newFailed,
    slow,
    open: kept.map(({ state }) => ({ ok: state.ok, failed: state.failed, sockets: state.sockets.size })),
    addresses: [...addresses],
    failures,
  })}\n`,
);
