// Runs inside a lab node (ip netns exec NODE node test/lab/converge.mjs ...): how long a service newly
// registered on another node takes to be reachable here by name.
//   converge.mjs CONSUL_URL BACKEND_ADDR BACKEND_PORT COUNT EXPECT
// For each of COUNT changes: register a new service (ID and name unique) with the Consul agent at
// CONSUL_URL (another node's client agent), pointing at BACKEND_ADDR:BACKEND_PORT (an HTTP server),
// then poll: `getent hosts NAME.local` (a fresh process: the node's resolver, /etc/hosts then DNS)
// and an HTTP GET to the address it gives, until the answer contains EXPECT. Then deregister it.
// Prints one JSON line: the times in ms.
import { execFile } from 'node:child_process';
import http from 'node:http';
import { promisify } from 'node:util';

const run = promisify(execFile);
const [consul, backendAddr, backendPort, countArg, expect] = process.argv.slice(2);
const count = Number(countArg);
const tag = Date.now().toString(36);

async function consulPut(path, body) {
  const res = await fetch(`${consul}${path}`, { method: 'PUT', body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(5000) });
  if (!res.ok) throw new Error(`PUT ${path}: HTTP ${res.status} ${await res.text()}`);
}

async function resolve(name) {
  try {
    const { stdout } = await run('getent', ['hosts', name], { timeout: 2000 });
    return stdout.trim().split(/\s+/)[0] || undefined;
  } catch {
    return undefined;
  }
}

function get(address, port) {
  return new Promise((resolve) => {
    const req = http.get({ host: address, port, path: '/', agent: false, timeout: 1000 }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve(body));
      res.on('error', () => resolve(''));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(''));
  });
}

const times = [];
const misses = [];
for (let i = 0; i < count; i++) {
  const name = `conv-${tag}-${i}`;
  const start = performance.now();
  await consulPut('/v1/agent/service/register', { ID: name, Name: name, Address: backendAddr, Port: Number(backendPort) });
  let done = false;
  while (performance.now() - start < 5000) {
    const address = await resolve(`${name}.local`);
    if (address && (await get(address, Number(backendPort))).includes(expect)) {
      done = true;
      break;
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  const ms = Math.round(performance.now() - start);
  if (done) times.push(ms);
  else misses.push(name);
  await consulPut(`/v1/agent/service/deregister/${name}`);
  await new Promise((r) => setTimeout(r, 100));
}
process.stdout.write(`${JSON.stringify({ times, misses })}\n`);
