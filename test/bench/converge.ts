/**
 * npm run bench:converge [-- --services S --instances I --changes N --json]: what one change costs at
 * catalog scale. A real Consul dev agent loaded with S services x I instances (through /v1/txn, in
 * batches, as a loader registering through the catalog API would), the real `loopmesh agent` as its own
 * process, talking to Consul through a counting relay (bytes and requests; it changes nothing), and
 * real TCP backends (one id server per instance slot, plus spares for address moves).
 *
 * Reports: the first full sync (agent start -> every service in its hosts block and listening); then N
 * changes, a quarter of each kind (a new service registered, a service deregistered, a health flip,
 * an instance's address changed), each timed from Consul accepting it to a new connection by name
 * (the address from the hosts block the agent writes) reaching the right backend (or, for a
 * deregistration, the name gone); p50 / p99 / max per kind and overall; the agent's RSS and CPU at
 * rest and under churn; requests and bytes it took from Consul per change and per minute at rest.
 * --routed R [--routed-kv]: the explicit-list modes (R services named by --services or a KV list).
 * --seed-table: Consul KV's address table starts with an address for every one of the S services, as
 * a node routing the whole catalog leaves it (with --routed, a new service's check-and-set then
 * writes a table of S entries, as in a cluster where some node routes everything).
 * Defaults: 2,000 x 5, 100 changes. Bounded in time; everything it starts is stopped.
 */
import { execa, type ResultPromise } from 'execa';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TestConsul } from '../support/consul.js';
import { freePort, startIdServer, type IdServer } from '../support/net.js';
import { wholeNumberFlag } from '../support/bench-flags.js';

const argv = process.argv.slice(2);
const flag = (name: string, fallback: number): number => wholeNumberFlag('bench:converge', argv, name, fallback);
const S = flag('services', 2000);
const I = flag('instances', 5);
const N = flag('changes', 100);
const jsonOut = argv.includes('--json');
/**
 * --routed R: the explicit-list mode: the agent routes only svc0..svc(R-1) (and the services the
 * changes register), named with --services, or with --routed-kv in a Consul KV list (--services-kv).
 * Every change then targets a routed service. Default: all services (the catalog-wide watch).
 */
const routedKv = argv.includes('--routed-kv');
const R = argv.includes('--routed') ? flag('routed', 50) : routedKv ? 50 : undefined;
if (R !== undefined && R > S) {
  process.stderr.write(`bench:converge: --routed ${R}: expected at most --services (${S})\n`);
  process.exit(2);
}
const routedCount = R ?? S;
const seedTable = argv.includes('--seed-table');
/** --agent-log FILE: the agent's log (debug level) goes there, to see where a change's time goes. */
const agentLog = argv.indexOf('--agent-log') >= 0 ? argv[argv.indexOf('--agent-log') + 1] : undefined;
/** --agent-profile DIR: a CPU profile of the agent (node --cpu-prof) is written there when it stops. */
const agentProfile = argv.indexOf('--agent-profile') >= 0 ? argv[argv.indexOf('--agent-profile') + 1] : undefined;
const root = join(import.meta.dirname, '..', '..');
const main = join(root, 'dist', 'agent', 'cli', 'main.js');
const out = (line = ''): void => void (jsonOut ? process.stderr : process.stdout).write(`${line}\n`);

/** A relay between the agent and Consul that counts requests (by request line) and bytes each way. */
async function countingRelay(target: number): Promise<{ port: number; counts: { requests: number; bytesIn: number; bytesOut: number; paths: Map<string, number> }; close(): void }> {
  const counts = { requests: 0, bytesIn: 0, bytesOut: 0, paths: new Map<string, number>() };
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const upstream = connect(target, '127.0.0.1');
    sockets.add(client).add(upstream);
    client.on('data', (chunk: Buffer) => {
      counts.bytesOut += chunk.length;
      // Request lines start a chunk after the previous request ended (keep-alive): count them.
      const text = chunk.toString('latin1');
      for (const m of text.matchAll(/(?:^|\r\n)(?:GET|PUT|POST|DELETE) (\/v1\/[a-z]+\/[a-z]+)/g)) {
        counts.requests += 1;
        counts.paths.set(m[1] ?? '', (counts.paths.get(m[1] ?? '') ?? 0) + 1);
      }
    });
    upstream.on('data', (chunk: Buffer) => void (counts.bytesIn += chunk.length));
    client.pipe(upstream).pipe(client);
    const end = (): void => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  const port = await freePort();
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  return { port, counts, close: () => { for (const s of sockets) s.destroy(); server.close(); } };
}

/** CPU seconds (user + system) and RSS in MB of a process, from /proc. */
function usage(pid: number): { cpu: number; rssMb: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]);
  const rssPages = Number(fields[21]);
  return { cpu: ticks / 100, rssMb: (rssPages * 4096) / 1048576 };
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? NaN;
}

/** The agent's heap at rest, from its own /metrics (prom-client's default process metrics), in MB. */
async function heapOf(admin: string): Promise<{ heapUsedMb?: number; heapTotalMb?: number; externalMb?: number }> {
  try {
    const text = await (await fetch(`http://${admin}/metrics`)).text();
    const mb = (name: string): number | undefined => {
      const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
      return m ? Math.round(Number(m[1]) / 1e6) : undefined;
    };
    return { heapUsedMb: mb('nodejs_heap_size_used_bytes'), heapTotalMb: mb('nodejs_heap_size_total_bytes'), externalMb: mb('nodejs_external_memory_bytes') };
  } catch {
    return {};
  }
}

/** NAME.local's address in the hosts file the agent writes (the resolver's view), or undefined. */
function resolveName(hostsFile: string, name: string): string | undefined {
  const text = readFileSync(hostsFile, 'utf8');
  const line = text.split('\n').find((l) => l.trimEnd().endsWith(` ${name}.local`) && l.startsWith('127.'));
  return line?.split(/\s+/)[0];
}

/** Who answers a new connection to address:port (an id server writes its id first), or '' on failure. */
function whoIs(address: string, port: number): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect({ host: address, port });
    let got = '';
    const done = (v: string): void => {
      socket.destroy();
      resolve(v);
    };
    socket.setTimeout(500, () => done(''));
    socket.on('data', (c) => {
      got += String(c);
      if (got.includes('\n')) done(got.trim());
    });
    socket.on('error', () => done(''));
    socket.on('close', () => done(got.trim()));
  });
}

/**
 * A restore is in service: new connections to the service's address reach the restored instance
 * again (some of 20 in a row; the weights are equal). Without this the next change was timed while
 * the agent still worked on the restore. Bounded: 10 s.
 */
async function settled(address: string, port: number, slot: string): Promise<void> {
  await until(async () => {
    for (let i = 0; i < 20; i++) if ((await whoIs(address, port)) === slot) return true;
    return false;
  }, 10_000);
}

async function until(check: () => Promise<boolean> | boolean, timeoutMs: number): Promise<number | undefined> {
  const started = performance.now();
  while (performance.now() - started < timeoutMs) {
    if (await check()) return performance.now() - started;
    await new Promise((r) => setTimeout(r, 2));
  }
  return undefined;
}

async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-converge-'));
  const consul = await TestConsul.start();
  const relay = await countingRelay(consul.httpPort);
  const port = 7000; // every service's port: instances differ by address
  const ids: IdServer[] = [];
  let agent: ResultPromise | undefined;
  try {
    // Instance slot k of every service runs on 127.0.0.(10+k); spare addresses take moved instances.
    for (let k = 0; k < I + 4; k++) ids.push(await startIdServer(`slot${k}`, `127.0.1.${10 + k}`, port));
    const addressOf = (k: number): string => `127.0.1.${10 + k}`;
    // Nodes node0..node(I-1); instance k of each service on node k; a service check on every instance
    // (passing), so health flips are check changes, as with an agent's TTL or HTTP check.
    const txn = async (ops: unknown[]): Promise<void> => {
      for (let i = 0; i < ops.length; i += 64) await consul.api('PUT', '/v1/txn', ops.slice(i, i + 64));
    };
    const node = (k: number): Record<string, string> => ({ Node: `bench-node${k}`, Address: addressOf(k) });
    const instanceOps = (service: string, k: number, address = addressOf(k), status = 'passing'): unknown[] => [
      { Service: { Verb: 'set', Node: `bench-node${k}`, Service: { ID: `${service}-${k}`, Service: service, Address: address, Port: port } } },
      { Check: { Verb: 'set', Check: { Node: `bench-node${k}`, CheckID: `check-${service}-${k}`, Name: 'bench', Status: status, ServiceID: `${service}-${k}`, ServiceName: service } } },
    ];
    const loadStarted = performance.now();
    await txn(Array.from({ length: I }, (_, k) => ({ Node: { Verb: 'set', Node: node(k) } })));
    const ops: unknown[] = [];
    for (let s = 0; s < S; s++) for (let k = 0; k < I; k++) ops.push(...instanceOps(`svc${s}`, k));
    await txn(ops);
    out(`loaded ${S} services x ${I} instances into Consul in ${((performance.now() - loadStarted) / 1000).toFixed(1)} s`);
    if (seedTable) {
      // 127.77.0.1, 127.77.0.2, ... in service order: the table a node routing every service leaves.
      const addresses = Object.fromEntries(Array.from({ length: S }, (_, s) => [`svc${s}`, `127.77.${(s + 1) >> 8}.${(s + 1) & 255}`]));
      await consul.api('PUT', '/v1/kv/loopmesh/addresses', { version: 1, addresses });
      out(`address table seeded in Consul KV with ${S} entries`);
    }

    // The explicit list: the routed services, and the names the changes register.
    const listed = R === undefined ? [] : [...Array.from({ length: R }, (_, i) => `svc${i}`), ...Array.from({ length: Math.ceil(N / 4) }, (_, i) => `new${i}`)];
    const selection = R === undefined ? [] : routedKv ? ['--services-kv', 'bench/routed'] : ['--services', listed.join(',')];
    if (R !== undefined && routedKv) await consul.api('PUT', '/v1/kv/bench/routed', listed);
    const hostsFile = join(dir, 'hosts');
    await writeFile(hostsFile, '127.0.0.1 localhost\n');
    const admin = `127.0.0.1:${await freePort()}`;
    const started = performance.now();
    agent = execa('node', [...(agentProfile ? ['--cpu-prof', `--cpu-prof-dir=${agentProfile}`] : []), ...(process.env.BENCH_HEAP_SNAPSHOT_DIR ? ['--heapsnapshot-signal=SIGUSR1', `--diagnostic-dir=${process.env.BENCH_HEAP_SNAPSHOT_DIR}`] : []), main, 'agent', '--consul', `http://127.0.0.1:${relay.port}`, '--run-dir', join(dir, 'run'), '--hosts-file', hostsFile, '--dns', 'off', '--admin', admin, '--range', '127.77.0.0/16', ...selection, '--log-level', agentLog ? (process.env.BENCH_AGENT_LOG_LEVEL ?? 'debug') : 'warn'], { reject: false, stdio: agentLog ? ['ignore', 'ignore', { file: agentLog }] : 'ignore', env: { ...process.env, CONSUL_HTTP_ADDR: '', LOOPMESH_LOG_FORMAT: 'json' } });
    const pid = agent.pid as number;
    const synced = await until(() => {
      try {
        const text = readFileSync(hostsFile, 'utf8');
        return (text.match(/\.local$/gm) ?? []).length >= routedCount;
      } catch {
        return false;
      }
    }, 300_000);
    if (synced === undefined) throw new Error(`the agent did not publish ${routedCount} names within 300 s`);
    const firstSync = (performance.now() - started) / 1000;
    const last = resolveName(hostsFile, `svc${routedCount - 1}`) ?? '';
    if ((await until(async () => (await whoIs(last, port)).startsWith('slot'), 30_000)) === undefined) throw new Error(`svc${routedCount - 1} at ${last}:${port} does not answer`);
    out(`first full sync: ${firstSync.toFixed(2)} s (${routedCount} names in the hosts block)`);

    // At rest: 20 s, nothing changes.
    await new Promise((r) => setTimeout(r, 3000));
    const restSeconds = 20;
    const rest0 = { ...relay.counts, ...usage(pid) };
    const paths0 = new Map(relay.counts.paths);
    await new Promise((r) => setTimeout(r, restSeconds * 1000));
    const rest1 = { ...relay.counts, ...usage(pid) };
    // BENCH_HEAP_SNAPSHOT_DIR: a heap snapshot of the agent at rest (node --heapsnapshot-signal), to see what holds the memory.
    if (process.env.BENCH_HEAP_SNAPSHOT_DIR) {
      process.kill(pid, 'SIGUSR1');
      await new Promise((r) => setTimeout(r, 15_000));
    }
    // After the snapshot: a scrape fills every series (its memory is part of what it measures).
    const rssParts = readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').filter((l) => /^Rss(Anon|File|Shmem):/.test(l)).map((l) => l.replace(/\s+/g, ' ')).join(', ');
    const heap = await heapOf(admin);
    const restPaths = [...relay.counts.paths].map(([p, n]) => [p, n - (paths0.get(p) ?? 0)] as const).filter(([, n]) => n > 0);
    if (restPaths.length > 0) out(`requests at rest by path: ${restPaths.map(([p, n]) => `${p} ${n}`).join(', ')}`);

    // Churn: N changes, the kinds in turn.
    const kinds = ['register', 'deregister', 'flip', 'address'] as const;
    const times: Record<(typeof kinds)[number], number[]> = { register: [], deregister: [], flip: [], address: [] };
    const misses: string[] = [];
    const churn0 = { ...relay.counts, ...usage(pid) };
    const churnStarted = performance.now();
    for (let c = 0; c < N; c++) {
      const kind = kinds[c % kinds.length] as (typeof kinds)[number];
      const round = Math.floor(c / kinds.length);
      const target = `svc${(round * 37 + 11) % routedCount}`;
      let took: number | undefined;
      if (kind === 'register') {
        const name = `new${round}`;
        if (agentLog) await writeFile(`${agentLog}.marks`, `${Date.now()} register ${name}\n`, { flag: 'a' });
        await txn(instanceOps(name, 0));
        took = await until(async () => {
          const a = resolveName(hostsFile, name);
          return a !== undefined && (await whoIs(a, port)) === 'slot0';
        }, 10_000);
      } else if (kind === 'deregister') {
        const name = `new${round}`;
        await txn([{ Service: { Verb: 'delete', Node: 'bench-node0', Service: { ID: `${name}-0`, Service: name } } }]);
        took = await until(() => resolveName(hostsFile, name) === undefined, 10_000);
      } else if (kind === 'flip') {
        // Instance 0 critical: done when 10 new connections in a row avoid it; then back to passing.
        await txn([instanceOps(target, 0, addressOf(0), 'critical')[1]]);
        const a = resolveName(hostsFile, target) ?? '';
        took = await until(async () => {
          for (let i = 0; i < 10; i++) if ((await whoIs(a, port)) === 'slot0') return false;
          return true;
        }, 10_000);
        await txn([instanceOps(target, 0, addressOf(0), 'passing')[1]]);
        await settled(a, port, 'slot0');
      } else {
        // Instance 1 moves to a spare address: done when a connection reaches it there (weights equal, so poll).
        const spare = I + (round % 4);
        await txn([instanceOps(target, 1, addressOf(spare))[0]]);
        const a = resolveName(hostsFile, target) ?? '';
        took = await until(async () => (await whoIs(a, port)) === `slot${spare}`, 10_000);
        await txn([instanceOps(target, 1, addressOf(1))[0]]);
        await settled(a, port, 'slot1');
      }
      if (took === undefined) misses.push(`${kind} ${target}`);
      else times[kind].push(took);
      // The restore of a flip or a move is in service (above) before the next change is timed.
      await new Promise((r) => setTimeout(r, 150));
    }
    const churnSeconds = (performance.now() - churnStarted) / 1000;
    const churn1 = { ...relay.counts, ...usage(pid) };
    // Every change above is two writes for flips and moves (the change and its restore).
    const writes = N + times.flip.length + times.address.length;

    const all = Object.values(times).flat();
    const row = (name: string, v: number[]): string => `| ${name} | ${v.length} | ${percentile(v, 50).toFixed(0)} | ${percentile(v, 99).toFixed(0)} | ${Math.max(...v).toFixed(0)} |`;
    const result = {
      services: S,
      routed: R === undefined ? 'all' : `${R} by ${routedKv ? '--services-kv' : '--services'}`,
      seededTable: seedTable,
      instances: I,
      changes: N,
      firstSyncSeconds: Number(firstSync.toFixed(2)),
      liveMs: Object.fromEntries([...kinds.map((k) => [k, { n: times[k].length, p50: Math.round(percentile(times[k], 50)), p99: Math.round(percentile(times[k], 99)), max: Math.round(Math.max(...times[k])) }]), ['all', { n: all.length, p50: Math.round(percentile(all, 50)), p99: Math.round(percentile(all, 99)), max: Math.round(Math.max(...all)) }]]),
      misses,
      rest: { cpuPercent: Number(((100 * (rest1.cpu - rest0.cpu)) / restSeconds).toFixed(1)), rssMb: Math.round(rest1.rssMb), requestsPerMinute: Math.round(((rest1.requests - rest0.requests) * 60) / restSeconds), bytesPerMinute: Math.round(((rest1.bytesIn - rest0.bytesIn) * 60) / restSeconds), ...heap },
      churn: { cpuPercent: Number(((100 * (churn1.cpu - churn0.cpu)) / churnSeconds).toFixed(1)), rssMb: Math.round(churn1.rssMb), requestsPerChange: Number(((churn1.requests - churn0.requests) / writes).toFixed(1)), bytesPerChange: Math.round((churn1.bytesIn - churn0.bytesIn) / writes) },
    };
    out('');
    out(`### ${S} services x ${I} instances${R === undefined ? '' : `, ${R} routed (${routedKv ? '--services-kv' : '--services'})`}: one change live by name (ms, from Consul's answer to the write)`);
    out('');
    out('| change | n | p50 | p99 | max |');
    out('|---|---|---|---|---|');
    for (const k of kinds) if (times[k].length > 0) out(row(k, times[k]));
    out(row('all', all));
    out('');
    out(`first full sync ${result.firstSyncSeconds} s; misses ${misses.length}`);
    out(`at rest: CPU ${result.rest.cpuPercent}% of a core, RSS ${result.rest.rssMb} MB, ${result.rest.requestsPerMinute} requests and ${result.rest.bytesPerMinute} bytes from Consul per minute`);
    if (heap.heapUsedMb !== undefined) out(`at rest, of the RSS: V8 heap ${heap.heapUsedMb} MB used of ${heap.heapTotalMb} MB, ${heap.externalMb} MB outside the heap (buffers); ${rssParts}`);
    out(`under churn: CPU ${result.churn.cpuPercent}% of a core, RSS ${result.churn.rssMb} MB, ${result.churn.requestsPerChange} requests and ${result.churn.bytesPerChange} bytes from Consul per write`);
    if (jsonOut) process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    // SIGINT lets node write the CPU profile; SIGKILL otherwise.
    agent?.kill(agentProfile ? 'SIGINT' : 'SIGKILL');
    await agent?.catch(() => undefined);
    relay.close();
    for (const s of ids) await s.close();
    await consul.close();
    await rm(dir, { recursive: true, force: true });
  }
}

run().catch((err: unknown) => {
  process.stderr.write(`bench:converge: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
