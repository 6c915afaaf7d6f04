import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { eventually } from '../support/net.js';
import { cannotMakeNamespaces, labHarness, labPids } from '../support/lab.js';
import { clientKinds, curlArgv, curlLoopArgv, holdArgv, parseCurlLoop, type ClientResult, type LoopRequest } from '../support/lab-clients.js';

// The proxy cluster (`loopmesh gateway`) in the namespace lab: scripts/lab.sh brings up a lab of its
// own (prefix lmg, 10.77.79.0/24, state in /run/loopmesh-lab-lmg) with two gateways on the server
// node (gateway1 at .128/27, gateway2 at .160/27). Every loopmesh process of node1 is killed (SIGKILL)
// while clients connect by name: the hosts block stays, the loopback address refuses, and clients
// that try each address of a name go to a gateway. Then node1 cut off from the web and redis nodes
// (its balancer's last resort is a gateway), and a gateway killed while node1 depends on them.
// Figures are printed with the prefix "gateway figure:" (for the README).

const repo = join(import.meta.dirname, '..', '..');
const prefix = 'lmg';
const net = '10.77.79';
const state = `/run/loopmesh-lab-${prefix}`;
const labEnv = { LAB_PREFIX: prefix, LAB_SUBNET: `${net}.0/24`, LAB_NODES: '3', LAB_STATE: state, LAB_GATEWAYS: '2' };
const node = (n: string): string => `${prefix}-${n}`;
const addr = { server: `${net}.10`, node1: `${net}.11`, node2: `${net}.12`, node3: `${net}.13` };
const gatewayAdmin = { gateway1: '127.0.0.1:9191', gateway2: '127.0.0.1:9192' } as const;
type GatewayName = keyof typeof gatewayAdmin;
/** The last octet of an address in gatewayK's range (.129-.159 for gateway1, .161-.191 for gateway2). */
const gatewayOf = (address: string): GatewayName | undefined => {
  if (!address.startsWith(`${net}.`)) return undefined;
  const last = Number(address.slice(net.length + 1));
  if (last > 128 && last < 160) return 'gateway1';
  if (last > 160 && last < 192) return 'gateway2';
  return undefined;
};

const skip = await cannotMakeNamespaces(prefix);
const { lab, inNode, must, freshUp } = labHarness(prefix, labEnv);

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** One curl from node1 by name: the HTTP code, the seconds it took, the address that answered. */
async function curlOnce(url = 'http://web.local/', maxTime = 5): Promise<{ code: string; seconds: number; peer: string }> {
  const r = await inNode('node1', curlArgv(url, maxTime), (maxTime + 5) * 1000);
  const [code = '000', seconds = '0', peer = ''] = String(r.stdout).trim().split(/\s+/);
  return { code, seconds: Number(seconds), peer };
}

async function healthOk(n: string, admin = '127.0.0.1:9190'): Promise<boolean> {
  const r = await inNode(n, ['curl', '-sf', '--max-time', '2', `http://${admin}/health`], 5000);
  return String(r.stdout).includes('"status":"ok"');
}

/** The connections a gateway's route for SERVICE has accepted so far (its admin /v1/routes). */
async function gatewayConnections(gateway: GatewayName, service = 'web'): Promise<number> {
  const text = await must(inNode('server', ['curl', '-sf', '--max-time', '2', `http://${gatewayAdmin[gateway]}/v1/routes`], 5000), `${gateway} /v1/routes`);
  const report = JSON.parse(text) as { routes: Array<{ service: string; totalConnections?: number }> };
  return report.routes.find((r) => r.service === service)?.totalConnections ?? 0;
}
async function gatewaysTotal(service = 'web'): Promise<number> {
  return (await gatewayConnections('gateway1', service)) + (await gatewayConnections('gateway2', service));
}

/** node1's hosts-file addresses for NAME, in file order. */
function hostsAddresses(name: string): string[] {
  const text = readFileSync(`/etc/netns/${node('node1')}/hosts`, 'utf8');
  return text
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((f) => f.length > 1 && !(f[0] ?? '').startsWith('#') && f.slice(1).includes(name))
    .map((f) => f[0] ?? '');
}

function cmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ');
  } catch {
    return '';
  }
}
function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}
async function pidsIn(n: string): Promise<number[]> {
  const r = await execa('ip', ['netns', 'pids', node(n)], { reject: false });
  return String(r.stdout).split('\n').filter(Boolean).map(Number);
}

/** SIGKILL every loopmesh process of NODE at once (balancer, control plane, any successor or worker). */
async function crashLoopmesh(n: string): Promise<number[]> {
  const pids = (await pidsIn(n)).filter((pid) => /dist\/agent\/cli\/main\.js/.test(cmdline(pid)));
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await eventually(() => pids.every((pid) => !running(pid)), 10_000, `the loopmesh processes of ${n} gone after SIGKILL`);
  const left = (await pidsIn(n)).filter((pid) => /dist\/agent\/cli\/main\.js/.test(cmdline(pid)) && running(pid));
  assert.deepEqual(left, [], `no loopmesh process runs on ${n}`);
  return pids;
}

async function startNode1Loopmesh(): Promise<void> {
  await must(lab(['start', 'node1', 'balancer'], 60_000), 'lab.sh start node1 balancer');
  await must(lab(['start', 'node1', 'loopmesh'], 60_000), 'lab.sh start node1 loopmesh');
  await eventually(() => healthOk('node1'), 30_000, "node1's loopmesh healthy again");
}

/** A curl loop by name on node1 for `seconds` (new connection each time); `during` runs meanwhile. */
async function curlLoop(seconds: number, during: () => Promise<void>, maxTime = 2): Promise<LoopRequest[]> {
  const loop = inNode('node1', curlLoopArgv('http://web.local/', seconds, 50, maxTime), (seconds + 30) * 1000);
  try {
    await during();
  } finally {
    // The loop's result is read even when `during` failed, so no process is left behind.
    await loop;
  }
  return parseCurlLoop(String((await loop).stdout));
}

const failedOf = (requests: LoopRequest[]): LoopRequest[] => requests.filter((r) => r.code !== '200');
const byPeer = (requests: LoopRequest[]): Record<string, number> => {
  const out: Record<string, number> = {};
  for (const r of requests) if (r.code === '200') out[r.peer] = (out[r.peer] ?? 0) + 1;
  return out;
};
const maxSeconds = (requests: LoopRequest[]): number => Math.max(0, ...requests.filter((r) => r.code === '200').map((r) => r.seconds));
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : (s[Math.floor((s.length - 1) / 2)] ?? NaN);
};


const figures: string[] = [];
function figure(t: TestContext, text: string): void {
  figures.push(text);
  t.diagnostic(text);
}

describe('the proxy cluster in the lab (loopmesh gateway; scripts/lab.sh, network namespaces, real Consul)', { skip, timeout: 420_000 }, () => {
  const suiteStart = Date.now();
  let upOk = false;

  before(async () => {
    const ms = await freshUp();
    upOk = true;
    process.stderr.write(`# gateway lab up in ${ms} ms\n`);
  });

  after(async () => {
    await inNode('node1', ['iptables', '-F'], 10_000).catch(() => undefined);
    const pids = await labPids(prefix, state);
    const down = await lab(['down'], 90_000);
    process.stderr.write(`# gateway lab suite, up to down: ${Math.round((Date.now() - suiteStart) / 1000)} s\n`);
    for (const f of figures) process.stderr.write(`gateway figure: ${f}\n`);
    assert.equal(down.exitCode, 0, `lab.sh down failed: ${String(down.all)}`);
    assert.deepEqual(String((await execa('ip', ['netns', 'list'])).stdout).split('\n').filter((l) => l.startsWith(`${prefix}-`)), [], 'no namespace left');
    assert.equal(existsSync(state), false, `${state} is removed`);
    await sleep(200);
    assert.deepEqual([...pids].filter(running), [], 'no process of the lab is left');
  });

  test('up: two healthy gateways in Consul; node1 resolves web.local to its loopback address first, then to each gateway', async (t) => {
    assert.ok(upOk);
    for (const g of ['gateway1', 'gateway2'] as const) assert.ok(await healthOk('server', gatewayAdmin[g]), `${g} healthy`);
    const passing = JSON.parse(await must(inNode('server', ['curl', '-sf', 'http://127.0.0.1:8500/v1/health/service/loopmesh-gateway?passing'], 5000), 'loopmesh-gateway in Consul')) as Array<{ Service: { ID: string } }>;
    assert.equal(passing.length, 2, `two passing loopmesh-gateway instances: ${passing.map((p) => p.Service.ID).join(', ')}`);
    const web = hostsAddresses('web.local');
    assert.match(web[0] ?? '', /^127\.77\.\d+\.\d+$/, 'the loopback address comes first');
    assert.deepEqual(web.slice(1).map(gatewayOf).sort(), ['gateway1', 'gateway2'], `then one address of each gateway: ${web.join(' ')}`);
    const getent = await must(inNode('node1', ['getent', 'ahosts', 'web.local'], 5000), 'getent ahosts web.local');
    const order = [...new Set(getent.split('\n').map((l) => l.split(/\s+/)[0] ?? ''))];
    assert.deepEqual(order, web, "getaddrinfo keeps the hosts file's order (loopback first)");
    // Served at each gateway's address directly, too (the AnyIP routes on the server node).
    for (const a of web.slice(1)) assert.equal((await curlOnce(`http://${a}/`)).code, '200', `http://${a}/ from node1`);
    figure(t, `node1 hosts: web.local -> ${web.join(', ')}; redis.local -> ${hostsAddresses('redis.local').join(', ')}`);
  });

  test("every loopmesh process of node1 killed (SIGKILL) while curl loops by name: the hosts block stays and clients go to a gateway", async (t) => {
    assert.ok(upOk);
    const hostsBefore = hostsAddresses('web.local');
    let killedAt = 0;
    let killed: number[] = [];
    const requests = await curlLoop(7, async () => {
      await sleep(2000);
      killedAt = Date.now();
      killed = await crashLoopmesh('node1');
    });
    const after = requests.filter((r) => r.at >= killedAt);
    const failed = failedOf(requests);
    const viaGateway = after.filter((r) => r.code === '200' && gatewayOf(r.peer));
    figure(t, `node1's loopmesh killed (SIGKILL, ${killed.length} processes) under a curl loop by name (new connection every 50 ms, --max-time 2): ${requests.length} requests, ${failed.length} failed ${JSON.stringify(failed.map((f) => `${f.code}/exit ${f.exit}`))}; after the kill ${viaGateway.length}/${after.length} answered by a gateway (${JSON.stringify(byPeer(after))}), median ${median(viaGateway.map((r) => r.seconds * 1000)).toFixed(0)} ms, max ${(maxSeconds(after) * 1000).toFixed(0)} ms per request`);
    assert.ok(killed.length >= 2, `the balancer and the control plane were killed (${killed.length} processes)`);
    assert.ok(failed.length <= 2, `at most 2 of ${requests.length} requests fail (${failed.length})`);
    assert.ok(viaGateway.length >= 5, `requests after the kill answered by a gateway (${viaGateway.length})`);
    assert.deepEqual(hostsAddresses('web.local'), hostsBefore, 'the hosts block is left as it was');

    const results: Array<{ kind: string; triesEveryAddress: boolean; result: ClientResult }> = [];
    for (const c of clientKinds()) {
      const r = await inNode('node1', c.argv, 20_000);
      let result: ClientResult;
      try {
        result = JSON.parse(String(r.stdout).trim().split('\n').at(-1) ?? '') as ClientResult;
      } catch {
        result = { ok: false, ms: NaN, detail: `no result (exit ${r.exitCode}): ${String(r.stderr).slice(0, 300)}` };
      }
      results.push({ kind: c.kind, triesEveryAddress: c.triesEveryAddress, result });
      figure(t, `node1's loopmesh down: ${c.kind}: ${result.ok ? 'ok' : 'FAILED'} in ${result.ms} ms${result.peer ? ` (answered by ${result.peer})` : ''}: ${result.detail}`);
    }
    for (const { kind, triesEveryAddress, result } of results) {
      if (!triesEveryAddress) continue;
      assert.ok(result.ok, `${kind} fails over to a gateway: ${result.detail}`);
      if (result.peer) assert.ok(gatewayOf(result.peer), `${kind} was answered by a gateway (${result.peer})`);
    }
  });

  test("node1's loopmesh started again: a connection held through a gateway is not cut; new connections are local again, also with both gateways stopped", async (t) => {
    assert.ok(upOk);
    assert.equal(await healthOk('node1'), false, "node1's loopmesh is still down (previous test)");
    // Connected by name while node1's loopmesh is down: through a gateway, for the whole restart.
    const hold = inNode('node1', holdArgv('http://web.local/', 9000), 40_000);
    await sleep(1500);
    const restartStarted = Date.now();
    await startNode1Loopmesh();
    figure(t, `node1's loopmesh started again (lab.sh start node1 balancer, loopmesh): healthy in ${Date.now() - restartStarted} ms`);
    const held = JSON.parse(String((await hold).stdout).trim()) as { ok: number; failed: number; sockets: number; peers: string[]; errors: Record<string, number> };
    figure(t, `a keep-alive connection opened through a gateway while node1's loopmesh was down, across its restart: ${held.ok} requests ok, ${held.failed} failed, ${held.sockets} socket(s), peer ${held.peers.join(',')} ${JSON.stringify(held.errors)}`);
    assert.equal(held.failed, 0, `no request on the held connection failed: ${JSON.stringify(held.errors)}`);
    assert.equal(held.sockets, 1, 'every request went on the one connection (not cut)');
    assert.ok(held.peers.every((p) => gatewayOf(p)), `it was through a gateway (${held.peers.join(',')})`);
    assert.ok(held.ok >= 20);

    const local = await curlOnce();
    assert.equal(local.code, '200');
    assert.match(local.peer, /^127\.77\./, `new connections go to node1's loopback address again (${local.peer})`);

    await must(lab(['stop', 'server', 'gateway1'], 60_000), 'lab.sh stop server gateway1');
    await must(lab(['stop', 'server', 'gateway2'], 60_000), 'lab.sh stop server gateway2');
    const passing = await must(inNode('server', ['curl', '-sf', 'http://127.0.0.1:8500/v1/health/service/loopmesh-gateway'], 5000), 'loopmesh-gateway in Consul');
    assert.equal((JSON.parse(passing) as unknown[]).length, 0, 'a gateway stopped gracefully deregisters itself');
    let ok = 0;
    for (let i = 0; i < 10; i++) {
      const r = await curlOnce();
      if (r.code === '200' && r.peer.startsWith('127.77.')) ok++;
    }
    figure(t, `both gateways stopped: 10 new connections by name from node1, ${ok} ok through node1's own loopmesh`);
    assert.equal(ok, 10, 'curl http://web.local/ from node1 works without any gateway (traffic is local)');
    await eventually(() => hostsAddresses('web.local').length === 1, 15_000, "the stopped gateways' addresses gone from node1's hosts block");

    await must(lab(['start', 'server', 'gateway1'], 60_000), 'lab.sh start server gateway1');
    await must(lab(['start', 'server', 'gateway2'], 60_000), 'lab.sh start server gateway2');
    const started = Date.now();
    await eventually(() => hostsAddresses('web.local').length === 3, 30_000, "both gateways' addresses back in node1's hosts block");
    figure(t, `gateways started again: back in node1's hosts block in ${Date.now() - started} ms`);
  });

  test('node1 cut off from the web and redis nodes (DROP rules in its namespace): web.local keeps answering through a gateway; direct again once healed', async (t) => {
    assert.ok(upOk);
    await eventually(async () => (await healthOk('server', gatewayAdmin.gateway1)) && (await healthOk('server', gatewayAdmin.gateway2)), 30_000, 'both gateways healthy');
    const before = await gatewaysTotal();
    const rules = [addr.node2, addr.node3].flatMap((a) => [['-A', 'OUTPUT', '-d', a, '-j', 'DROP'], ['-A', 'INPUT', '-s', a, '-j', 'DROP']]);
    for (const rule of rules) await must(inNode('node1', ['iptables', ...rule]), `iptables ${rule.join(' ')} on node1`);
    const cut = Date.now();
    const times: number[] = [];
    let ok = 0;
    try {
      for (let i = 0; i < 10; i++) {
        const r = await curlOnce('http://web.local/', 10);
        if (r.code === '200') {
          ok++;
          times.push(Math.round(r.seconds * 1000));
        }
        assert.match(r.peer, /^127\.77\./, 'curl connects to the local loopmesh (which is up)');
      }
      const through = (await gatewaysTotal()) - before;
      const redis = await inNode('node1', ['redis-cli', '-h', 'redis.local', 'ping'], 15_000);
      figure(t, `node1 partitioned from node2 and node3: 10 requests by name, ${ok} ok, times ${times.join(', ')} ms (direct connects time out after --connect-timeout 1 s, then the gateway); the gateways' web connections grew by ${through}; redis-cli ping: ${String(redis.stdout).trim() || String(redis.stderr).trim()}`);
      assert.equal(ok, 10, 'every request answered during the partition');
      assert.ok(through >= 10, `the answers came through the gateways (their web connections grew by ${through})`);
      assert.equal(String(redis.stdout).trim(), 'PONG', 'redis.local through a gateway too');
    } finally {
      await must(inNode('node1', ['iptables', '-F']), 'iptables -F on node1');
    }
    const healed = Date.now();
    // Direct again: a few requests in a row that no gateway sees (within the passive-health back-off).
    await eventually(async () => {
      const start = await gatewaysTotal();
      for (let i = 0; i < 3; i++) if ((await curlOnce()).code !== '200') return false;
      if ((await gatewaysTotal()) !== start) {
        await sleep(1000);
        return false;
      }
      return true;
    }, 70_000, 'node1 connecting to web directly again (no gateway connection for 3 requests)');
    figure(t, `partition (${healed - cut} ms) removed: node1's web traffic direct again after ${Date.now() - healed} ms`);
  });

  test("the gateway node1 tries first hot-restarted, then killed (SIGKILL), while node1's loopmesh is down and curl loops by name: the other gateway takes over", async (t) => {
    assert.ok(upOk);
    await eventually(() => hostsAddresses('web.local').length === 3, 30_000, 'both gateways in node1 hosts block');
    // The gateway whose address comes first after the loopback one: the one clients use.
    const first = gatewayOf(hostsAddresses('web.local')[1] ?? '');
    assert.ok(first, `a gateway address second in node1's hosts block: ${hostsAddresses('web.local').join(' ')}`);
    const other: GatewayName = first === 'gateway1' ? 'gateway2' : 'gateway1';
    const pidFile = join(state, node('server'), `${first}.pid`);
    await crashLoopmesh('node1');
    try {
      // Hot restart (SIGUSR2): a new process takes over the listening sockets.
      const pidBefore = readFileSync(pidFile, 'utf8').trim();
      let restart: { exitCode?: number; all?: string } = {};
      const hot = await curlLoop(5, async () => {
        await sleep(1500);
        const r = await lab(['restart', 'server', first], 60_000);
        restart = { exitCode: r.exitCode, all: String(r.all) };
      });
      const pidAfter = existsSync(pidFile) ? readFileSync(pidFile, 'utf8').trim() : '';
      figure(t, `${first} (first in node1's hosts) hot restart (lab.sh restart server ${first}, SIGUSR2: pid ${pidBefore} -> ${pidAfter || 'none'}; exit ${restart.exitCode}) under a curl loop by name from node1 (its loopmesh down): ${hot.length} requests, ${failedOf(hot).length} failed; answered by ${JSON.stringify(byPeer(hot))}`);
      assert.equal(restart.exitCode, 0, `lab.sh restart server ${first}: ${restart.all}`);
      assert.notEqual(pidAfter, pidBefore, `another process serves ${first} now`);
      assert.equal(failedOf(hot).length, 0, 'no request fails during the hot restart');
      assert.ok(hot.every((r) => gatewayOf(r.peer) === first), `${first} answered throughout: ${JSON.stringify(byPeer(hot))}`);
      await eventually(() => healthOk('server', gatewayAdmin[first]), 20_000, `${first} healthy after the hot restart`);

      let killedAt = 0;
      let killDone = 0;
      const requests = await curlLoop(6, async () => {
        await sleep(1500);
        killedAt = Date.now();
        await must(lab(['kill', 'server', first], 30_000), `lab.sh kill server ${first}`);
        killDone = Date.now();
      });
      const before = requests.filter((r) => r.at < killedAt);
      const after = requests.filter((r) => r.at >= killedAt);
      const failed = failedOf(requests);
      figure(t, `${first} (first in node1's hosts) killed (SIGKILL) under a curl loop by name from node1 (its loopmesh down, --max-time 2): ${requests.length} requests, ${failed.length} failed; before the kill answered by ${JSON.stringify(byPeer(before))}, after it by ${JSON.stringify(byPeer(after))}, median ${median(after.filter((r) => r.code === '200').map((r) => r.seconds * 1000)).toFixed(0)} ms, max ${(maxSeconds(after) * 1000).toFixed(0)} ms per request`);
      assert.ok(failed.length <= 2, `at most 2 of ${requests.length} requests fail (${failed.length})`);
      assert.ok(before.some((r) => gatewayOf(r.peer) === first), `${first} answered before the kill: ${JSON.stringify(byPeer(before))}`);
      // Requests that started once `lab.sh kill` had returned (the process gone).
      const late = after.filter((r) => r.at >= killDone);
      assert.ok(late.length > 0 && late.every((r) => r.code === '200' && gatewayOf(r.peer) === other), `${other} answers once ${first} is gone: ${JSON.stringify(byPeer(late))}`);
    } finally {
      await lab(['start', 'server', first], 60_000);
      await startNode1Loopmesh();
    }
    await eventually(() => healthOk('server', gatewayAdmin[first]), 20_000, `${first} healthy after lab.sh start`);
    const back = await curlOnce();
    assert.equal(back.code, '200');
    assert.match(back.peer, /^127\.77\./, 'node1 local again');
  });
});
