/**
 * npm run bench:idle [-- --connections N --json]: N idle connections held open through one
 * `loopmesh balancer` process (default 10,000), each proxied to a real backend. Reports the balancer's
 * RSS per connection above its own baseline, the kernel's TCP memory per connection (from
 * /proc/net/sockstat, for both ends of both hops), and the time a new connection takes through the
 * balancer (p50 / p99 of 200) before and while the N are held. Memory is read --settle S seconds
 * (default 2) after the last connection opened (and the baseline as long after start-up), as RSS, then again after a full GC in each balancer
 * process (loaded with --expose-gc and a small probe, see probeSource) with the V8 heap's figures. The backend and the clients live in
 * a separate process, so the balancer's figures are its own. Bounded in time; everything is stopped.
 */
import { execa, type ResultPromise } from 'execa';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from '../support/net.js';

const argv = process.argv.slice(2);
const at = argv.indexOf('--connections');
const N = at >= 0 ? Number(argv[at + 1]) : 10_000;
if (!Number.isInteger(N) || N < 1 || N > 100_000) {
  process.stderr.write(`bench:idle: --connections ${String(argv[at + 1])}: expected a whole number from 1 to 100000\n`);
  process.exit(2);
}
const jsonOut = argv.includes('--json');
/** Seconds between the last connection opened and the reading of memory (--settle S). */
const settleAt = argv.indexOf('--settle');
const settleSeconds = settleAt >= 0 ? Number(argv[settleAt + 1]) : 2;
if (!Number.isFinite(settleSeconds) || settleSeconds < 0 || settleSeconds > 600) {
  process.stderr.write(`bench:idle: --settle ${String(argv[settleAt + 1])}: expected seconds from 0 to 600\n`);
  process.exit(2);
}
/**
 * File descriptors: each held connection is two sockets in the balancer. The hard limit here (20,000,
 * not raisable without CAP_SYS_RESOURCE) cannot take 10,000 connections in one process, so above it
 * the balancer runs with --workers 2 (one node still: a supervisor and two workers sharing the socket).
 */
const hardLimit = Number(readFileSync('/proc/self/limits', 'utf8').match(/Max open files\s+\d+\s+(\d+)/)?.[1] ?? 1024);
const workers = 2 * N + 512 > hardLimit ? Math.ceil((2 * N + 512) / (hardLimit - 512)) : 1;
const root = join(import.meta.dirname, '..', '..');
const main = join(root, 'dist', 'agent', 'cli', 'main.js');
const out = (line = ''): void => void (jsonOut ? process.stderr : process.stdout).write(`${line}\n`);

/**
 * The other side, in a process of its own: an echo backend, and a holder that opens N connections
 * through the balancer (checking each one echoes) and keeps them until told to stop.
 */
const backendSource = `
const net = require('node:net');
const backend = net.createServer((s) => { s.on('error', () => {}); s.pipe(s); });
backend.listen(Number(process.argv[1]), '127.0.0.1', () => process.send({ backend: true }));
`;
const holderSource = `
const net = require('node:net');
const [address, port, count] = process.argv.slice(1).map((v, i) => (i === 0 ? v : Number(v)));
{
  process.send({ ready: true });
  process.once('message', async () => {
    const held = [];
    let failed = 0;
    const open = () => new Promise((resolve) => {
      const s = net.connect({ host: address, port }, () => {
        s.once('data', () => { held.push(s); resolve(); });
        s.write('x');
      });
      s.on('error', () => { failed++; resolve(); });
    });
    for (let i = 0; i < count; i += 200) await Promise.all(Array.from({ length: Math.min(200, count - i) }, open));
    process.send({ held: held.length, failed });
    process.once('message', () => { for (const s of held) s.destroy(); process.exit(0); });
  });
}
`;

/**
 * Loaded into the balancer (and, through execArgv, its workers) with `--expose-gc --require`: a unix
 * socket per process in the probe directory that, when connected to, runs a full GC and answers
 * with process.memoryUsage(). The balancer's own code is not touched; the probe costs one server.
 */
const probeSource = `
const net = require('node:net');
const dir = process.env.LOOPMESH_IDLE_PROBE_DIR;
if (dir && typeof globalThis.gc === 'function') {
  const server = net.createServer((s) => {
    s.on('error', () => {});
    globalThis.gc();
    globalThis.gc();
    const newSpace = require('node:v8').getHeapSpaceStatistics().find((x) => x.space_name === 'new_space');
    s.end(JSON.stringify({ ...process.memoryUsage(), newSpace: newSpace ? newSpace.space_size : 0 }));
  });
  server.on('error', () => {});
  server.listen(require('node:path').join(dir, process.pid + '.sock'));
  server.unref();
}
`;

interface Memory {
  rss: number;
  heapTotal: number;
  heapUsed: number;
  external: number;
  arrayBuffers: number;
  /** The V8 young generation's size (part of heapTotal): it grows with the allocation rate, not per connection. */
  newSpace: number;
}

/** A full GC in every balancer process, then their memory summed (bytes). */
async function probeMemory(dir: string): Promise<Memory> {
  const sum: Memory = { rss: 0, heapTotal: 0, heapUsed: 0, external: 0, arrayBuffers: 0, newSpace: 0 };
  for (const name of readdirSync(dir).filter((n) => n.endsWith('.sock'))) {
    const m = await new Promise<Memory | undefined>((resolve) => {
      let text = '';
      const s = connect(join(dir, name));
      s.setEncoding('utf8');
      s.on('data', (d: string) => (text += d));
      s.on('end', () => {
        try {
          resolve(JSON.parse(text) as Memory);
        } catch {
          resolve(undefined);
        }
      });
      s.on('error', () => resolve(undefined));
    });
    if (!m) continue;
    for (const k of Object.keys(sum) as Array<keyof Memory>) sum[k] += m[k];
  }
  return sum;
}

/** RSS of a process and its children (a supervisor and its workers), in MB. */
function rssMb(pid: number): number {
  const one = (p: number): number => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1] ?? 0) / 1024;
  let children: number[] = [];
  try {
    children = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    children = [];
  }
  return one(pid) + children.reduce((sum, c) => sum + one(c), 0);
}

/** The kernel's TCP memory in pages (sockstat's "mem") and sockets in use. */
function sockstat(): { memPages: number; inuse: number } {
  const text = readFileSync('/proc/net/sockstat', 'utf8');
  const tcp = /TCP: inuse (\d+) orphan \d+ tw \d+ alloc \d+ mem (\d+)/.exec(text);
  return { inuse: Number(tcp?.[1] ?? NaN), memPages: Number(tcp?.[2] ?? NaN) };
}

async function connectTimes(address: string, port: number, n: number): Promise<{ p50: number; p99: number; failed: number }> {
  const times: number[] = [];
  let failed = 0;
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect({ host: address, port }, () => {
        s.once('data', () => {
          s.destroy();
          resolve(true);
        });
        s.write('y');
      });
      s.setTimeout(3000, () => {
        s.destroy();
        resolve(false);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) times.push(performance.now() - started);
    else failed++;
  }
  times.sort((a, b) => a - b);
  const pick = (p: number): number => times[Math.min(times.length - 1, Math.ceil((p / 100) * times.length) - 1)] ?? NaN;
  return { p50: Number(pick(50).toFixed(2)), p99: Number(pick(99).toFixed(2)), failed };
}

type Child = ResultPromise<{ reject: false; stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }>;

async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-idle-'));
  const runDir = join(dir, 'run');
  const probeDir = join(dir, 'probe');
  const probeFile = join(dir, 'probe.cjs');
  const address = '127.77.250.1';
  const port = await freePort(address);
  const backendPort = await freePort();
  let balancer: ResultPromise | undefined;
  let holder: Child | undefined;
  let backend: Child | undefined;
  try {
    await execa('mkdir', ['-m', '700', runDir, probeDir]);
    await writeFile(probeFile, probeSource);
    await writeFile(join(runDir, 'balancer.json'), JSON.stringify({ version: 1, services: [{ service: 'idle', name: 'idle', fqdn: 'idle.local', address, port, policy: 'round-robin', empty: 'reject', backends: [{ id: 'echo', address: '127.0.0.1', port: backendPort }] }] }));
    // Each held connection is two sockets in the balancer (client and backend side), and two in the holder.
    const files = String(hardLimit);
    const withLimit = (args: string[]): [string, string[]] => ['prlimit', [`--nofile=${files}:${files}`, ...args]];
    backend = execa(...withLimit(['node', '-e', backendSource, String(backendPort)]), { reject: false, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    await new Promise((resolve) => backend?.once('message', resolve));
    holder = execa(...withLimit(['node', '-e', holderSource, address, String(port), String(N)]), { reject: false, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    await new Promise((resolve) => holder?.once('message', resolve));
    balancer = execa(...withLimit(['node', '--expose-gc', '--require', probeFile, main, 'balancer', '--run-dir', runDir, '--dns', 'off', '--hosts-file', 'off', '--log-level', 'warn', '--idle-timeout', '3600', '--workers', String(workers)]), { reject: false, stdio: 'ignore', env: { LOOPMESH_IDLE_PROBE_DIR: probeDir } });
    // prlimit execs node: the pid is the balancer's.
    const pid = balancer.pid as number;
    const up = await connectTimes(address, port, 1).catch(() => ({ failed: 1 }));
    for (let i = 0; i < 100 && up.failed > 0 && (await connectTimes(address, port, 1)).failed > 0; i++) await new Promise((r) => setTimeout(r, 100));
    // The baseline settles as long as the held state does: V8 shrinks its young generation (16 MB after
    // start-up) once allocation stops, so an unsettled baseline against a settled reading would hide memory.
    await new Promise((r) => setTimeout(r, Math.max(500, settleSeconds * 1000)));
    const beforeRss = rssMb(pid);
    const beforeMem = await probeMemory(probeDir);
    const before = { rss: beforeRss, gcRss: rssMb(pid), mem: beforeMem, ...sockstat(), connect: await connectTimes(address, port, 200) };
    const started = performance.now();
    holder?.send('open');
    const opened = (await new Promise((resolve) => holder?.once('message', resolve))) as { held: number; failed: number };
    const openSeconds = (performance.now() - started) / 1000;
    await new Promise((r) => setTimeout(r, settleSeconds * 1000));
    const duringRss = rssMb(pid);
    const duringMem = await probeMemory(probeDir);
    const during = { rss: duringRss, gcRss: rssMb(pid), mem: duringMem, ...sockstat(), connect: await connectTimes(address, port, 200) };
    const perConn = (bytes: number): number => Math.round(bytes / Math.max(1, opened.held));
    const held = opened.held;
    const result = {
      connections: N,
      workers,
      held,
      failedToOpen: opened.failed,
      openSeconds: Number(openSeconds.toFixed(1)),
      settleSeconds,
      balancerRssMb: { before: Number(before.rss.toFixed(1)), during: Number(during.rss.toFixed(1)) },
      balancerBytesPerConnection: Math.round(((during.rss - before.rss) * 1048576) / Math.max(1, held)),
      // The same after a full GC in each balancer process (--expose-gc), and the V8 heap's share.
      balancerRssAfterGcMb: { before: Number(before.gcRss.toFixed(1)), during: Number(during.gcRss.toFixed(1)) },
      balancerBytesPerConnectionAfterGc: Math.round(((during.gcRss - before.gcRss) * 1048576) / Math.max(1, held)),
      heapUsedBytesPerConnection: perConn(during.mem.heapUsed - before.mem.heapUsed),
      heapTotalBytesPerConnection: perConn(during.mem.heapTotal - before.mem.heapTotal),
      externalBytesPerConnection: perConn(during.mem.external - before.mem.external),
      newSpaceMb: { before: Number((before.mem.newSpace / 1048576).toFixed(1)), during: Number((during.mem.newSpace / 1048576).toFixed(1)) },
      // Four sockets per held connection: the client's and the balancer's on each hop.
      kernelTcpBytesPerConnection: Math.round(((during.memPages - before.memPages) * 4096) / Math.max(1, held)),
      tcpSocketsInUse: { before: before.inuse, during: during.inuse },
      newConnectionMs: { before: before.connect, during: during.connect },
    };
    out(`### ${held} idle connections through one loopmesh balancer${workers > 1 ? ` (--workers ${workers}: the open-files limit here is ${hardLimit})` : ''} (${opened.failed} failed to open, ${result.openSeconds} s to open)`);
    out('');
    out('| | before | while held |');
    out('|---|---|---|');
    out(`| balancer RSS | ${result.balancerRssMb.before} MB | ${result.balancerRssMb.during} MB |`);
    out(`| balancer RSS after a full GC | ${result.balancerRssAfterGcMb.before} MB | ${result.balancerRssAfterGcMb.during} MB |`);
    out(`| balancer V8 heap used / total after a full GC | ${(before.mem.heapUsed / 1048576).toFixed(1)} / ${(before.mem.heapTotal / 1048576).toFixed(1)} MB | ${(during.mem.heapUsed / 1048576).toFixed(1)} / ${(during.mem.heapTotal / 1048576).toFixed(1)} MB |`);
    out(`| balancer V8 young generation (part of heap total) | ${result.newSpaceMb.before} MB | ${result.newSpaceMb.during} MB |`);
    out(`| TCP sockets in use (kernel) | ${before.inuse} | ${during.inuse} |`);
    out(`| new connection through the balancer, p50 / p99 (200) | ${before.connect.p50} / ${before.connect.p99} ms | ${during.connect.p50} / ${during.connect.p99} ms |`);
    out('');
    out(`balancer memory per held connection: ${result.balancerBytesPerConnection} bytes RSS above its baseline (${result.balancerBytesPerConnectionAfterGc} after a full GC; V8 heap used ${result.heapUsedBytesPerConnection}, heap total ${result.heapTotalBytesPerConnection}, external ${result.externalBytesPerConnection}); kernel TCP memory per held connection (4 sockets): ${result.kernelTcpBytesPerConnection} bytes`);
    if (jsonOut) process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    holder?.send?.('stop');
    balancer?.kill('SIGKILL');
    await balancer?.catch(() => undefined);
    backend?.kill('SIGKILL');
    await backend?.catch(() => undefined);
    setTimeout(() => holder?.kill('SIGKILL'), 2000).unref();
    await holder?.catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

run().catch((err: unknown) => {
  process.stderr.write(`bench:idle: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
