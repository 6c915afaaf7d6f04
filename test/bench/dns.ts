/**
 * DNS benchmark (npm run bench:dns): loopmesh's responder against dnsmasq, both answering the same
 * names, driven by dnsperf with the same query list. Asserts nothing beyond "it ran and answered
 * right"; bounded in time; every process it starts is stopped.
 *
 *   - loopmesh: a real `loopmesh balancer` process with a run dir holding balancer.json for N services
 *     (svc0.local ... on 127.90.x.y), its DNS responder on a free port (--hosts-file off).
 *   - dnsmasq: its own process (--keep-in-foreground --no-resolv --no-hosts --addn-hosts=FILE), the
 *     same N names and addresses in FILE, on another free port.
 *   - Cases, in interleaved rounds after a first dnsmasq A run: loopmesh A, dnsmasq A, loopmesh SRV
 *     (_svcI._tcp.local; dnsmasq does not serve our SRV), dnsmasq A. Every loopmesh run sits between
 *     two dnsmasq A runs, and a round's ratio is loopmesh's queries/s over the mean of those two: the
 *     two servers measured under the same outside load, as far as a shared machine allows.
 *   - Pinning (BENCH_DNS_PIN, default on when there are 2 CPUs or more): dnsperf runs on the first CPU
 *     (taskset -c), and both servers, every thread of them, on the last one: each server gets one CPU
 *     to itself, the same for both, and neither competes with its own load generator.
 *   - Per case the median over the rounds: queries/s, lost, non-NOERROR answers, latency avg/max and
 *     standard deviation (what dnsperf prints; it gives no percentiles), the server's CPU per query
 *     and CPU use (from /proc); for A each round's ratio loopmesh/dnsmasq of queries/s and of CPU per
 *     query (dnsmasq's over loopmesh's: what each could answer with a core to itself), their median
 *     and minimum.
 *
 * Flags: --json (JSON on stdout, the tables on stderr).
 * Environment: BENCH_DNS_SECONDS (per run, default 2), BENCH_DNS_ROUNDS (default 10), BENCH_DNS_NAMES
 * (default 200), BENCH_DNS_CLIENTS (dnsperf -c, default 4), BENCH_DNS_OUTSTANDING (dnsperf -q,
 * default 100), BENCH_DNS_QPS (dnsperf -Q, default 0: no cap), BENCH_DNS_WARMUP (seconds of
 * uncounted load on each case first, default 2), BENCH_DNS_PIN (1 or 0; default 1 with 2 CPUs or
 * more), BENCH_CLI=dist|tsx (which loopmesh CLI runs), BENCH_DNS_NODE_ARGS (extra node flags for the
 * loopmesh process, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof").
 */
import { chmod, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { eventually, freePort } from '../support/net.js';
import { dig } from '../support/resolve.js';

const argv = process.argv.slice(2);
const jsonOut = argv.includes('--json');
const root = join(import.meta.dirname, '..', '..');
const distCli = join(root, 'dist', 'agent', 'cli', 'main.js');
const useDist = (process.env.BENCH_CLI ?? (existsSync(distCli) ? 'dist' : 'tsx')) === 'dist';

function setting(name: string, fallback: number, min: number): number {
  const raw = process.env[name];
  const value = raw === undefined || raw === '' ? fallback : Number(raw);
  if (!Number.isInteger(value) || value < min) {
    process.stderr.write(`bench-dns: ${name}=${String(raw)} is not valid; expected a whole number >= ${min}\n`);
    process.exit(2);
  }
  return value;
}

const seconds = setting('BENCH_DNS_SECONDS', 2, 1);
const rounds = setting('BENCH_DNS_ROUNDS', 10, 1);
const names = setting('BENCH_DNS_NAMES', 200, 1);
const clients = setting('BENCH_DNS_CLIENTS', 4, 1);
const outstanding = setting('BENCH_DNS_OUTSTANDING', 100, 1);
const qpsCap = setting('BENCH_DNS_QPS', 0, 0);
const warmup = setting('BENCH_DNS_WARMUP', 2, 0);
const nodeArgs = (process.env.BENCH_DNS_NODE_ARGS ?? '').split(/\s+/).filter(Boolean);
/** The CPUs this process may run on (Cpus_allowed_list in /proc/self/status), else 0 .. n-1. */
function allowedCpus(): number[] {
  try {
    const list = /Cpus_allowed_list:\s*(\S+)/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    if (list) {
      const cpus: number[] = [];
      for (const part of list.split(',')) {
        const [from, to = from] = part.split('-').map(Number);
        if (from === undefined || to === undefined || !Number.isInteger(from) || !Number.isInteger(to)) throw new Error(`cannot read "${list}"`);
        for (let c = from; c <= to; c++) cpus.push(c);
      }
      if (cpus.length > 0) return cpus;
    }
  } catch {
    // Not Linux, or an unexpected format: count them instead.
  }
  return Array.from({ length: availableParallelism() }, (_, i) => i);
}
const cpus = allowedCpus();
const pin = setting('BENCH_DNS_PIN', cpus.length >= 2 ? 1 : 0, 0) === 1 && cpus.length >= 2;
const loadCpuId = cpus[0]!;
const serverCpuId = cpus.at(-1)!;
/** taskset prefixes: dnsperf on the first CPU, both servers (all their threads, as they start under it) on the last. */
const loadCpu = pin ? ['taskset', '-c', String(loadCpuId)] : [];
const serverCpu = pin ? ['taskset', '-c', String(serverCpuId)] : [];
/** Runs `command` under a taskset prefix when pinned: taskset execs it, so the PID is the command's. */
function pinned(prefix: string[], command: string, args: string[]): [string, string[]] {
  return prefix.length === 0 ? [command, args] : [prefix[0]!, [...prefix.slice(1), command, ...args]];
}
if (names > 60_000) {
  process.stderr.write(`bench-dns: BENCH_DNS_NAMES=${names} is too many; expected at most 60000\n`);
  process.exit(2);
}

function out(line = ''): void {
  (jsonOut ? process.stderr : process.stdout).write(`${line}\n`);
}

function median(values: number[]): number {
  const s = values.filter((v) => Number.isFinite(v)).sort((x, y) => x - y);
  if (s.length === 0) return NaN;
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** Service i's name and address: svcI.local on 127.90.x.y. */
function nameOf(i: number): string {
  return `svc${i}`;
}
function addressOf(i: number): string {
  return `127.90.${(i + 1) >> 8}.${(i + 1) & 0xff}`;
}

/** CPU seconds (user + system) a process has used, from /proc/PID/stat. */
function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // Fields 14 and 15 (utime, stime), counted from 1 with pid, comm: here from state (field 3).
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return NaN;
  }
}

interface Run {
  sent: number;
  completed: number;
  lost: number;
  /** Answers other than NOERROR. */
  notNoerror: number;
  qps: number;
  avgMs: number;
  maxMs: number;
  stddevMs: number;
  /** Server CPU seconds per 1,000 answered queries. */
  cpuMsPerKq: number;
  /** Server CPU use over the run, % of one core. */
  cpuPercent: number;
}

function parseDnsperf(text: string): Omit<Run, 'cpuMsPerKq' | 'cpuPercent'> {
  const num = (re: RegExp): number => Number(re.exec(text)?.[1] ?? NaN);
  const codes = /Response codes:\s+(.*)/.exec(text)?.[1] ?? '';
  let notNoerror = 0;
  for (const m of codes.matchAll(/(\w+) (\d+) \(/g)) if (m[1] !== 'NOERROR') notNoerror += Number(m[2]);
  return {
    sent: num(/Queries sent:\s+(\d+)/),
    completed: num(/Queries completed:\s+(\d+)/),
    lost: num(/Queries lost:\s+(\d+)/),
    notNoerror,
    qps: num(/Queries per second:\s+([\d.]+)/),
    avgMs: num(/Average Latency \(s\):\s+([\d.]+)/) * 1000,
    maxMs: num(/Average Latency \(s\):\s+[\d.]+ \(min [\d.]+, max ([\d.]+)\)/) * 1000,
    stddevMs: num(/Latency StdDev \(s\):\s+([\d.]+)/) * 1000,
  };
}

async function dnsperf(port: number, file: string, serverPid: number | undefined, runSeconds = seconds): Promise<Run> {
  const args = ['-s', '127.0.0.1', '-p', String(port), '-d', file, '-c', String(clients), '-q', String(outstanding), '-l', String(runSeconds), '-t', '2'];
  if (qpsCap > 0) args.push('-Q', String(qpsCap));
  const cpuBefore = cpuSeconds(serverPid);
  const started = process.hrtime.bigint();
  const [command, commandArgs] = pinned(loadCpu, 'dnsperf', args);
  const r = await execa(command, commandArgs, { reject: false, timeout: (seconds + 20) * 1000, all: true });
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = cpuSeconds(serverPid) - cpuBefore;
  const text = r.all ?? '';
  if (r.exitCode !== 0 || !/Queries per second/.test(text)) throw new Error(`dnsperf ${args.join(' ')} failed (exit ${String(r.exitCode)}): ${text.slice(-600)}`);
  const run = parseDnsperf(text);
  return { ...run, cpuMsPerKq: (cpu * 1000 * 1000) / run.completed, cpuPercent: (cpu / elapsed) * 100 };
}

interface Server {
  name: string;
  port: number;
  pid: number | undefined;
  stop: () => Promise<void>;
}

function stopper(p: ResultPromise): () => Promise<void> {
  return async () => {
    if (p.exitCode !== null || p.signalCode !== null) return;
    p.kill('SIGTERM');
    const timer = setTimeout(() => p.kill('SIGKILL'), 5000);
    await p.catch(() => undefined);
    clearTimeout(timer);
  };
}

async function startLoopmesh(dir: string): Promise<Server> {
  const runDir = join(dir, 'run');
  await mkdir(runDir, { mode: 0o700 });
  const services = [];
  for (let i = 0; i < names; i++) {
    const address = addressOf(i);
    services.push({
      service: nameOf(i),
      name: nameOf(i),
      fqdn: `${nameOf(i)}.local`,
      address,
      port: await freePort(address),
      policy: 'round-robin',
      empty: 'reject',
      backends: [{ id: `node/${nameOf(i)}`, address: '127.0.0.1', port: 9 }],
    });
  }
  await writeFile(join(runDir, 'balancer.json'), JSON.stringify({ version: 1, services }));
  const port = await freePort();
  const cli = useDist ? [distCli] : ['--import', 'tsx', join(root, 'agent', 'cli', 'main.ts')];
  const [command, args] = pinned(serverCpu, 'node', [...nodeArgs, ...cli, 'balancer', '--run-dir', runDir, '--dns', `127.0.0.1:${port}`, '--hosts-file', 'off', '--log-level', 'warn']);
  const p = execa(command, args, {
    reject: false,
    stdio: ['ignore', 'ignore', 'inherit'],
    cleanup: true,
  });
  const server = { name: 'loopmesh', port, pid: p.pid, stop: stopper(p) };
  const last = `${nameOf(names - 1)}.local`;
  try {
    await eventually(async () => {
      if (p.exitCode !== null) throw new Error(`loopmesh balancer exited with ${p.exitCode}`);
      return (await dig({ host: '127.0.0.1', port }, last)).answers[0] === addressOf(names - 1);
    }, 30_000, `loopmesh answers ${last}`);
  } catch (err) {
    await server.stop();
    throw err;
  }
  return server;
}

async function startDnsmasq(dir: string): Promise<Server> {
  // dnsmasq drops to user nobody: its directory and file must be readable by anyone.
  const own = join(dir, 'dnsmasq');
  await mkdir(own);
  await chmod(dir, 0o755);
  await chmod(own, 0o755);
  const hosts = join(own, 'hosts');
  const lines: string[] = [];
  for (let i = 0; i < names; i++) lines.push(`${addressOf(i)}\t${nameOf(i)}.local`);
  await writeFile(hosts, `${lines.join('\n')}\n`, { mode: 0o644 });
  const port = await freePort();
  const [command, args] = pinned(serverCpu, 'dnsmasq', [
    '--keep-in-foreground', '--conf-file=/dev/null', '--pid-file=', '--no-resolv', '--no-hosts', `--addn-hosts=${hosts}`, `--port=${port}`, '--listen-address=127.0.0.1', '--bind-interfaces', '--local-ttl=5', '--log-facility=-']);
  const p = execa(command, args, { reject: false, stdio: ['ignore', 'ignore', 'inherit'], cleanup: true });
  const server = { name: 'dnsmasq', port, pid: p.pid, stop: stopper(p) };
  const last = `${nameOf(names - 1)}.local`;
  try {
    await eventually(async () => {
      if (p.exitCode !== null) throw new Error(`dnsmasq exited with ${p.exitCode}`);
      return (await dig({ host: '127.0.0.1', port }, last)).answers[0] === addressOf(names - 1);
    }, 15_000, `dnsmasq answers ${last}`);
  } catch (err) {
    await server.stop();
    throw err;
  }
  return server;
}

/** Both answer the same address for a sample of names, and loopmesh answers SRV with the service's port. */
async function checkAnswers(servers: Server[]): Promise<void> {
  const sample = [0, Math.floor(names / 2), names - 1];
  for (const i of sample) {
    for (const s of servers) {
      const r = await dig({ host: '127.0.0.1', port: s.port }, `${nameOf(i)}.local`);
      if (r.status !== 'NOERROR' || r.answers[0] !== addressOf(i)) throw new Error(`${s.name} answers ${nameOf(i)}.local with ${r.status} ${r.answers.join(', ')}; expected ${addressOf(i)}`);
    }
  }
  const loopmesh = servers.find((s) => s.name === 'loopmesh')!;
  const srv = await dig({ host: '127.0.0.1', port: loopmesh.port }, `_${nameOf(0)}._tcp.local`, 'SRV');
  if (srv.status !== 'NOERROR' || !/^0 1 \d+ svc0\.local\.$/.test(srv.answers[0] ?? '')) throw new Error(`loopmesh answers _svc0._tcp.local SRV with ${srv.status} ${srv.answers.join(', ')}`);
}

interface Case {
  name: string;
  server: Server;
  file: string;
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-bench-dns-'));
  const servers: Server[] = [];
  try {
    const aFile = join(dir, 'queries-a.txt');
    const srvFile = join(dir, 'queries-srv.txt');
    const order = Array.from({ length: names }, (_, i) => i);
    await writeFile(aFile, `${order.map((i) => `${nameOf(i)}.local A`).join('\n')}\n`);
    await writeFile(srvFile, `${order.map((i) => `_${nameOf(i)}._tcp.local SRV`).join('\n')}\n`);
    const loopmesh = await startLoopmesh(dir);
    servers.push(loopmesh);
    const dnsmasq = await startDnsmasq(dir);
    servers.push(dnsmasq);
    await checkAnswers(servers);
    const version = (await execa('dnsmasq', ['--version'], { reject: false })).stdout.split('\n')[0] ?? '?';
    out(`# DNS responder: loopmesh vs dnsmasq (dnsperf, ${names} names, ${warmup} s warm-up, then ${rounds} rounds x ${seconds} s, -c ${clients} -q ${outstanding}${qpsCap ? ` -Q ${qpsCap}` : ''})`);
    out(`loopmesh: ${useDist ? 'dist' : 'tsx'} ${nodeArgs.join(' ')} (node ${process.version}); ${version}`);
    const cases: Case[] = [
      { name: 'loopmesh A', server: loopmesh, file: aFile },
      { name: 'dnsmasq A', server: dnsmasq, file: aFile },
      { name: 'loopmesh SRV', server: loopmesh, file: srvFile },
    ];
    // Warm-up, not counted: the JIT compiles loopmesh's hot path and its answer cache fills.
    if (warmup > 0) for (const c of cases) await dnsperf(c.server.port, c.file, c.server.pid, warmup);
    const results = new Map<string, Run[]>(cases.map((c) => [c.name, []]));
    const runCase = async (c: Case, round: number): Promise<Run> => {
      const run = await dnsperf(c.server.port, c.file, c.server.pid);
      results.get(c.name)!.push(run);
      process.stderr.write(`round ${round + 1} ${c.name}: ${Math.round(run.qps)} q/s, lost ${run.lost}, not NOERROR ${run.notNoerror}, server CPU ${run.cpuPercent.toFixed(0)}%, ${(run.cpuMsPerKq).toFixed(1)} µs/query\n`);
      return run;
    };
    // Each round: loopmesh A, dnsmasq A, loopmesh SRV, dnsmasq A, after a first dnsmasq A run: every
    // loopmesh run is compared with the dnsmasq runs just before and just after it, under the same
    // outside load as far as a shared machine allows.
    const [lmA, dmA, lmSrv] = cases as [Case, Case, Case];
    const perRound: { qps: number; cpu: number; srvQps: number }[] = [];
    let before = await runCase(dmA, 0);
    for (let round = 0; round < rounds; round++) {
      const mine = await runCase(lmA, round);
      const between = await runCase(dmA, round);
      const srv = await runCase(lmSrv, round);
      const after = await runCase(dmA, round);
      const r = {
        qps: mine.qps / ((before.qps + between.qps) / 2),
        cpu: (before.cpuMsPerKq + between.cpuMsPerKq) / 2 / mine.cpuMsPerKq,
        srvQps: srv.qps / ((between.qps + after.qps) / 2),
      };
      perRound.push(r);
      process.stderr.write(`round ${round + 1} loopmesh / dnsmasq: A ${r.qps.toFixed(2)}x queries/s, ${r.cpu.toFixed(2)}x CPU per query; SRV ${r.srvQps.toFixed(2)}x queries/s\n`);
      before = after;
    }
    const rows = cases.map((c) => {
      const runs = results.get(c.name)!;
      const m = (f: (r: Run) => number): number => median(runs.map(f));
      return {
        case: c.name,
        qps: m((r) => r.qps),
        qpsRuns: runs.map((r) => Math.round(r.qps)),
        lost: runs.reduce((sum, r) => sum + r.lost, 0),
        notNoerror: runs.reduce((sum, r) => sum + r.notNoerror, 0),
        avgMs: m((r) => r.avgMs),
        maxMs: m((r) => r.maxMs),
        stddevMs: m((r) => r.stddevMs),
        cpuMsPerKq: m((r) => r.cpuMsPerKq),
        cpuPercent: m((r) => r.cpuPercent),
      };
    });
    const ratios = perRound.map((r) => r.qps);
    const srvRatios = perRound.map((r) => r.srvQps);
    const cpuRatios = perRound.map((r) => r.cpu);
    const ratio = median(ratios);
    const ratioMin = Math.min(...ratios);
    // What each could do with a whole core to itself: less sensitive to other load on a shared machine.
    const cpuRatio = median(cpuRatios);
    const cpuRatioMin = Math.min(...cpuRatios);
    out('');
    out('| case | queries/s (median) | per run | lost (all runs) | not NOERROR | latency avg ms | max ms | stddev ms | server CPU µs / query | server CPU % |');
    out('|---|---|---|---|---|---|---|---|---|---|');
    for (const r of rows) {
      out(`| ${r.case} | ${Math.round(r.qps)} | ${r.qpsRuns.join(' / ')} | ${r.lost} | ${r.notNoerror} | ${r.avgMs.toFixed(3)} | ${r.maxMs.toFixed(2)} | ${r.stddevMs.toFixed(3)} | ${r.cpuMsPerKq.toFixed(1)} | ${r.cpuPercent.toFixed(0)} |`);
    }
    out('');
    out(`pinned: ${pin ? `dnsperf on CPU ${loadCpuId}, both servers on CPU ${serverCpuId}` : 'no'}`);
    out(`loopmesh / dnsmasq (A queries/s) per round: ${ratios.map((r) => `${r.toFixed(2)}x`).join(', ')}; median ${ratio.toFixed(2)}x, min ${ratioMin.toFixed(2)}x`);
    out(`loopmesh SRV / dnsmasq A (queries/s) per round: ${srvRatios.map((r) => `${r.toFixed(2)}x`).join(', ')}; median ${median(srvRatios).toFixed(2)}x, min ${Math.min(...srvRatios).toFixed(2)}x`);
    out(`by server CPU per query (dnsmasq's / loopmesh's) per round: ${cpuRatios.map((r) => `${r.toFixed(2)}x`).join(', ')}; median ${cpuRatio.toFixed(2)}x, min ${cpuRatioMin.toFixed(2)}x`);
    if (jsonOut) {
      process.stdout.write(`${JSON.stringify({ names, rounds, seconds, warmup, clients, outstanding, qpsCap, cli: useDist ? 'dist' : 'tsx', dnsmasq: version, node: process.version, pinned: pin ? { dnsperf: loadCpuId, servers: serverCpuId } : false, cases: rows, ratioA: ratio, ratioAMin: ratioMin, ratioARounds: ratios, srvRatioRounds: srvRatios, cpuRatioA: cpuRatio, cpuRatioAMin: cpuRatioMin, cpuRatioARounds: cpuRatios }, null, 2)}\n`);
    }
  } finally {
    for (const s of servers) await s.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

const deadline = setTimeout(
  () => {
    process.stderr.write('bench-dns: took too long, giving up\n');
    process.exit(1);
  },
  (120 + 3 * (warmup + 25) + (rounds * 4 + 1) * (seconds + 25)) * 1000,
);
deadline.unref();
main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench-dns: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
