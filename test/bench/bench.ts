/**
 * Benchmarks (npm run bench): a real Consul dev agent, the real loopmesh CLI as its own processes,
 * real nginx (the backend), real HAProxy and wrk, all on loopback. Asserts nothing beyond "it ran";
 * bounded in time.
 *
 *   1. HTTP through loopmesh's balancer vs through HAProxy vs straight to nginx, in ONE run with
 *      interleaved rounds (each round runs every case against every target, the target order
 *      rotating), median per case: requests/s (MB/s for 1 MB answers), p50, p99, CPU time per request
 *      and RSS of the proxy process, ratios loopmesh/HAProxy and loopmesh/direct. Both proxies get
 *      their config from loopmesh: `loopmesh agent --render-only` renders balancer.json (served by
 *      `loopmesh balancer`) and haproxy.cfg (templates/haproxy.cfg.hbs, served by HAProxy with nbthread 1).
 *   2. Convergence: a new service registered -> NAME.local answers in DNS and accepts connections;
 *      an instance deregistered -> no new connection reaches it. N changes each, p50 / p99 / max.
 *
 * Flags: --json (JSON on stdout, the tables on stderr), --no-convergence, --cases a,b (case names).
 * Environment: BENCH_SECONDS (per round and case, default 4), BENCH_ROUNDS (default 5),
 * BENCH_CHANGES (convergence, default 20), BENCH_WORKERS (the scaling row, default 2; 0 or 1: none),
 * BENCH_CLI=dist|tsx (which loopmesh CLI runs: the built dist/ (default when built) or the sources).
 */
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { cpus as osCpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers } from '../support/net.js';
import { dig } from '../support/resolve.js';

const argv = process.argv.slice(2);
const jsonOut = argv.includes('--json');
const convergence = !argv.includes('--no-convergence');
const casesFlag = argv.indexOf('--cases') >= 0 ? argv[argv.indexOf('--cases') + 1] : undefined;
const seconds = Number(process.env.BENCH_SECONDS ?? 4);
const rounds = Number(process.env.BENCH_ROUNDS ?? 5);
const changes = Number(process.env.BENCH_CHANGES ?? 20);
const scaleWorkers = Number(process.env.BENCH_WORKERS ?? 2);
const root = join(import.meta.dirname, '..', '..');
const distCli = join(root, 'dist', 'agent', 'cli', 'main.js');
const useDist = (process.env.BENCH_CLI ?? (existsSync(distCli) ? 'dist' : 'tsx')) === 'dist';
for (const [name, value] of [['BENCH_SECONDS', seconds], ['BENCH_ROUNDS', rounds], ['BENCH_CHANGES', changes], ['BENCH_WORKERS', scaleWorkers]] as const) {
  if (!Number.isInteger(value) || value < 0 || (name !== 'BENCH_WORKERS' && value < 1)) {
    process.stderr.write(`bench: ${name}=${String(process.env[name])} is not valid; expected a whole number >= 1\n`);
    process.exit(2);
  }
}

/** The loopmesh CLI as a command line: the built one, or the sources through tsx. */
function cli(args: string[]): [string, string[]] {
  return useDist ? ['node', [distCli, ...args]] : ['node', ['--import', 'tsx', join(root, 'agent', 'cli', 'main.ts'), ...args]];
}

function out(line = ''): void {
  (jsonOut ? process.stderr : process.stdout).write(`${line}\n`);
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

function median(values: number[]): number {
  const s = values.filter((v) => Number.isFinite(v)).sort((x, y) => x - y);
  if (s.length === 0) return NaN;
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

function summary(samples: number[]): string {
  const s = [...samples].sort((x, y) => x - y);
  return `n=${s.length}  p50=${percentile(s, 50)} ms  p99=${percentile(s, 99)} ms  max=${s[s.length - 1]} ms`;
}

interface Route {
  service: string;
  address: string;
  port: number;
  backends: Array<{ id: string }>;
}

async function routes(admin: string): Promise<Route[]> {
  const res = await fetch(`http://${admin}/v1/routes`, { signal: AbortSignal.timeout(2000) });
  const body = (await res.json()) as { routes?: Route[] };
  return body.routes ?? [];
}

// ---------------------------------------------------------------------------------------------
// wrk

/** A duration as wrk prints it (123.45us, 1.20ms, 2.00s, 1.00m) in milliseconds. */
function wrkMs(text: string | undefined): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(text ?? '');
  if (!m) return NaN;
  const scale = { us: 0.001, ms: 1, s: 1000, m: 60_000 }[m[2] as 'us' | 'ms' | 's' | 'm'];
  return Number(m[1]) * scale;
}

/** A size as wrk prints it (1.23MB, 512.00KB) in bytes (wrk's units are powers of 1024). */
function wrkBytes(text: string | undefined): number {
  const m = /^([\d.]+)(B|KB|MB|GB|TB)$/.exec(text ?? '');
  if (!m) return NaN;
  const scale = { B: 1, KB: 1024, MB: 1024 ** 2, GB: 1024 ** 3, TB: 1024 ** 4 }[m[2] as 'B' | 'KB' | 'MB' | 'GB' | 'TB'];
  return Number(m[1]) * scale;
}

interface WrkRun {
  requests: number;
  rps: number;
  /** Megabytes (10^6 bytes) read per second. */
  mbps: number;
  p50: number;
  p99: number;
  /** Socket errors and non-2xx answers. */
  errors: number;
  errorText: string;
}

function parseWrk(text: string): WrkRun {
  const done = /(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read/.exec(text);
  const requests = Number(done?.[1] ?? NaN);
  const elapsed = wrkMs(done?.[2]) / 1000;
  const socketErrors = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(text);
  const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(text)?.[1] ?? 0);
  const errors = (socketErrors ? Number(socketErrors[1]) + Number(socketErrors[2]) + Number(socketErrors[3]) + Number(socketErrors[4]) : 0) + non2xx;
  return {
    requests,
    rps: Number(/Requests\/sec:\s+([\d.]+)/.exec(text)?.[1] ?? NaN),
    mbps: wrkBytes(done?.[3]) / elapsed / 1e6,
    p50: wrkMs(/\s50%\s+(\S+)/.exec(text)?.[1]),
    p99: wrkMs(/\s99%\s+(\S+)/.exec(text)?.[1]),
    errors,
    errorText: [socketErrors?.[0], non2xx ? `Non-2xx: ${non2xx}` : undefined].filter(Boolean).join('; ') || 'none',
  };
}

interface Case {
  name: string;
  label: string;
  connections: number;
  threads: number;
  path: string;
  close: boolean;
  /** Throughput in MB/s rather than requests/s. */
  bytes: boolean;
}

const allCases: Case[] = [
  { name: 'keepalive-50', label: 'keep-alive, 50 connections', connections: 50, threads: 2, path: '/', close: false, bytes: false },
  { name: 'keepalive-1', label: 'keep-alive, 1 connection', connections: 1, threads: 1, path: '/', close: false, bytes: false },
  { name: 'close-50', label: 'new connection per request, 50 at once', connections: 50, threads: 2, path: '/', close: true, bytes: false },
  { name: 'close-1', label: 'new connection per request, 1 at a time', connections: 1, threads: 1, path: '/', close: true, bytes: false },
  { name: '1mb-10', label: '1 MB answers, keep-alive, 10 connections', connections: 10, threads: 2, path: '/1m', close: false, bytes: true },
];

async function wrk(c: Case, base: string): Promise<WrkRun> {
  const args = [`-t${c.threads}`, `-c${c.connections}`, `-d${seconds}s`, '--latency', ...(c.close ? ['-H', 'Connection: close'] : []), `${base}${c.path}`];
  const r = await execa('wrk', args, { timeout: (seconds + 30) * 1000 });
  return parseWrk(r.stdout);
}

// ---------------------------------------------------------------------------------------------
// /proc: CPU time and RSS of a process and its descendants (a balancer with workers)

const clockTicks = Number(process.env.BENCH_CLK_TCK ?? 100);

function procTree(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const ppid = Number(fields[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
    } catch {
      // gone meanwhile
    }
  }
  const all: number[] = [];
  const walk = (p: number): void => {
    all.push(p);
    for (const c of children.get(p) ?? []) walk(c);
  };
  walk(pid);
  return all;
}

/** utime + stime in seconds, summed over the process tree. */
function cpuSeconds(pids: number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      // Fields after the command: state(0) ppid(1) ... utime(11) stime(12).
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      // gone meanwhile
    }
  }
  return ticks / clockTicks;
}

/** VmRSS in MB, summed over the process tree. */
function rssMb(pids: number[]): number {
  let kb = 0;
  for (const pid of pids) {
    try {
      kb += Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
    } catch {
      // gone meanwhile
    }
  }
  return kb / 1024;
}

// ---------------------------------------------------------------------------------------------
// processes

/** Wrapped: an execa process is a thenable, and an async function would wait for it to exit. */
async function startNginx(dir: string, port: number): Promise<{ process: ResultPromise }> {
  const www = join(dir, 'www');
  await mkdir(www, { recursive: true });
  await writeFile(join(www, '1m'), randomBytes(1024 * 1024), { mode: 0o644 });
  // nginx started by root serves from worker processes running as nobody: they must reach the file.
  await chmod(dir, 0o755);
  await chmod(www, 0o755);
  const conf = join(dir, 'nginx.conf');
  await writeFile(
    conf,
    [
      'worker_processes 1;',
      'daemon off;',
      `pid ${dir}/nginx.pid;`,
      `error_log ${dir}/nginx-error.log;`,
      'events { worker_connections 4096; }',
      'http {',
      ` client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};`,
      ' keepalive_requests 1000000; access_log off; sendfile on; tcp_nopush on;',
      ` server { listen 127.0.0.1:${port} backlog=4096; root ${www};`,
      '  location = / { default_type text/plain; return 200 "hello from nginx\\n"; }',
      ' }',
      '}',
      '',
    ].join('\n'),
  );
  const nginx = execa('nginx', ['-c', conf, '-p', dir], { reject: false, stdio: 'ignore', cleanup: true });
  await eventually(() => fetch(`http://127.0.0.1:${port}/`).then((r) => r.ok), 10_000, 'nginx');
  return { process: nginx };
}

function canConnect(address: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: address, port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function commandExists(cmd: string): Promise<boolean> {
  const r = await execa('sh', ['-c', `command -v ${cmd} || test -x /usr/sbin/${cmd}`], { reject: false });
  return r.exitCode === 0;
}

interface Stoppable {
  stop(): Promise<unknown>;
}

// ---------------------------------------------------------------------------------------------
// results

interface Sample {
  rps: number;
  mbps: number;
  p50: number;
  p99: number;
  cpuUsPerRequest: number;
  rssMb: number;
  errors: number;
}

interface TargetResult {
  /** requests/s, or MB/s for a `bytes` case. */
  throughput: number;
  rps: number;
  mbps: number;
  p50Ms: number;
  p99Ms: number;
  /** null: not a proxy (direct). */
  cpuUsPerRequest: number | null;
  rssMb: number | null;
  errors: number;
  rounds: number;
}

interface CaseResult {
  name: string;
  label: string;
  unit: 'requests/s' | 'MB/s';
  connections: number;
  newConnectionPerRequest: boolean;
  targets: Record<string, TargetResult>;
  ratios: {
    loopmeshVsHaproxy: number;
    loopmeshVsDirect: number;
    haproxyVsDirect: number;
    p99LoopmeshVsHaproxy: number;
    cpuLoopmeshVsHaproxy: number;
    [key: string]: number;
  };
}

interface Target {
  name: string;
  label: string;
  base: string;
  /** The proxy's process id (its tree is measured); undefined for direct. */
  pid: number | undefined;
}

function fmt(n: number | null, digits = 0): string {
  if (n === null || !Number.isFinite(n)) return 'n/a';
  return n.toFixed(digits);
}

async function main(): Promise<void> {
  const missing: string[] = [];
  for (const cmd of ['wrk', 'nginx', 'haproxy']) if (!(await commandExists(cmd))) missing.push(cmd);
  if (missing.length > 0) throw new Error(`missing commands: ${missing.join(', ')} (Debian packages wrk, nginx-light, haproxy; scripts/bench.sh installs them)`);
  const cases = casesFlag ? allCases.filter((c) => casesFlag.split(',').includes(c.name)) : allCases;
  if (cases.length === 0) throw new Error(`--cases ${casesFlag}: no such case; expected some of ${allCases.map((c) => c.name).join(',')}`);

  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-bench-'));
  const consul = await TestConsul.start();
  const stops: Stoppable[] = [];
  const started = Date.now();
  const stopProcess = (p: ResultPromise, signal: NodeJS.Signals = 'SIGTERM'): Stoppable => ({
    stop: async () => {
      p.kill(signal);
      await p;
    },
  });
  try {
    const nginxPort = await freePort();
    const nginx = (await startNginx(dir, nginxPort)).process;
    stops.push(stopProcess(nginx, 'SIGQUIT'));
    const webPort = await freePort();
    // No TTL check: a run outlasts any TTL, and a check gone critical mid-run would empty the route.
    await consul.register({ id: 'web-1', name: 'web', port: nginxPort, meta: { 'loopmesh-port': String(webPort) } });

    // The control plane in --render-only mode, once per data plane: each renders the same routes
    // (balancer.json, haproxy.cfg) on its own address range, so the proxies listen side by side.
    const renderer = async (name: string, range: string): Promise<{ runDir: string; route: Route }> => {
      const runDir = join(dir, `run-${name}`);
      const admin = `127.0.0.1:${await freePort()}`;
      const [cmd, args] = cli(['agent', '--render-only', '--consul', consul.url, '--run-dir', runDir, '--hosts-file', 'off', '--dns', 'off', '--admin', admin, '--range', range, '--kv-prefix', `bench-${name}`, '--log-level', 'warn']);
      const agent = execa(cmd, args, { reject: false, stdio: ['ignore', 'ignore', 'inherit'], cleanup: true });
      stops.push(stopProcess(agent));
      const route = await eventually(async () => (await routes(admin).catch(() => [])).find((r) => r.service === 'web' && r.backends.length === 1), 30_000, `the web route rendered for ${name}`);
      await eventually(() => existsSync(join(runDir, 'balancer.json')) && existsSync(join(runDir, 'haproxy.cfg')), 10_000, `${runDir}/balancer.json and haproxy.cfg`);
      return { runDir, route };
    };
    const balancer = async (runDir: string, route: Route, extra: string[]): Promise<{ pid: number | undefined }> => {
      const [cmd, args] = cli(['balancer', '--run-dir', runDir, '--hosts-file', 'off', '--dns', 'off', '--log-level', 'warn', ...extra]);
      const p = execa(cmd, args, { reject: false, stdio: ['ignore', 'ignore', 'inherit'], cleanup: true });
      stops.push(stopProcess(p));
      await eventually(() => canConnect(route.address, route.port), 30_000, `loopmesh balancer on ${route.address}:${route.port}`);
      await eventually(() => fetch(`http://${route.address}:${route.port}/`).then((r) => r.ok).catch(() => false), 10_000, 'an answer through loopmesh');
      return { pid: p.pid };
    };

    const lm = await renderer('loopmesh', '127.79.0.0/16');
    const lmProcess = await balancer(lm.runDir, lm.route, []);
    const hp = await renderer('haproxy', '127.80.0.0/16');
    const haproxyCfg = join(hp.runDir, 'haproxy.cfg');
    const cfg = await readFile(haproxyCfg, 'utf8');
    if (!/^global$/m.test(cfg)) throw new Error(`${haproxyCfg} has no "global" section`);
    const benchCfg = join(dir, 'haproxy-bench.cfg');
    // One thread, as the one loopmesh worker; the rest as rendered.
    await writeFile(benchCfg, cfg.replace(/^global$/m, 'global\n    nbthread 1'));
    const check = await execa('haproxy', ['-c', '-q', '-f', benchCfg], { reject: false, all: true });
    if (check.exitCode !== 0) throw new Error(`haproxy -c ${benchCfg}: ${check.all}`);
    const haproxy = execa('haproxy', ['-db', '-f', benchCfg], { reject: false, stdio: ['ignore', 'ignore', 'inherit'], cleanup: true });
    stops.push(stopProcess(haproxy, 'SIGKILL'));
    await eventually(() => fetch(`http://${hp.route.address}:${hp.route.port}/`).then((r) => r.ok).catch(() => false), 10_000, 'an answer through haproxy');

    const targets: Target[] = [
      { name: 'direct', label: 'direct to nginx', base: `http://127.0.0.1:${nginxPort}`, pid: undefined },
      { name: 'loopmesh', label: 'loopmesh balancer (1 worker)', base: `http://${lm.route.address}:${lm.route.port}`, pid: lmProcess.pid },
      { name: 'haproxy', label: 'HAProxy (nbthread 1)', base: `http://${hp.route.address}:${hp.route.port}`, pid: haproxy.pid },
    ];

    // Scaling: `loopmesh balancer --workers N`, where the flag exists.
    const [helpCmd, helpArgs] = cli(['balancer', '--help']);
    const help = (await execa(helpCmd, helpArgs, { reject: false })).stdout;
    let scaling: { workers: number; available: boolean; note: string } = { workers: scaleWorkers, available: false, note: '' };
    if (scaleWorkers >= 2) {
      if (/--workers\b/.test(help)) {
        const w = await renderer(`workers${scaleWorkers}`, '127.81.0.0/16');
        const wProcess = await balancer(w.runDir, w.route, ['--workers', String(scaleWorkers)]);
        targets.push({ name: `loopmesh-w${scaleWorkers}`, label: `loopmesh balancer (--workers ${scaleWorkers})`, base: `http://${w.route.address}:${w.route.port}`, pid: wProcess.pid });
        scaling = { workers: scaleWorkers, available: true, note: '' };
      } else {
        // SCALING: `loopmesh balancer --workers N` does not exist (yet) in this tree; the row is left out.
        scaling = { workers: scaleWorkers, available: false, note: "'loopmesh balancer --workers' is not available in this build; no scaling row" };
      }
    }

    // Warm-up: JIT and connection pools of every target, not measured.
    for (const t of targets) await execa('wrk', ['-t1', '-c4', '-d1s', `${t.base}/`], { reject: false, timeout: 30_000 });

    const samples = new Map<string, Sample[]>();
    for (let round = 0; round < rounds; round++) {
      for (const c of cases) {
        // The order of targets rotates each round: none always runs right after another's load.
        const order = targets.map((_, i) => targets[(i + round) % targets.length]!);
        for (const t of order) {
          const pids = t.pid === undefined ? [] : procTree(t.pid);
          const cpuBefore = cpuSeconds(pids);
          const run = await wrk(c, t.base);
          const cpu = cpuSeconds(pids) - cpuBefore;
          const key = `${c.name}/${t.name}`;
          samples.set(key, [
            ...(samples.get(key) ?? []),
            {
              rps: run.rps,
              mbps: run.mbps,
              p50: run.p50,
              p99: run.p99,
              cpuUsPerRequest: t.pid === undefined ? NaN : (cpu / run.requests) * 1e6,
              rssMb: t.pid === undefined ? NaN : rssMb(pids),
              errors: run.errors,
            },
          ]);
          if (run.errors > 0) process.stderr.write(`bench: round ${round + 1} ${key}: ${run.errorText}\n`);
        }
      }
      process.stderr.write(`bench: round ${round + 1}/${rounds} done (${Math.round((Date.now() - started) / 1000)} s)\n`);
    }

    const results: CaseResult[] = cases.map((c) => {
      const per: Record<string, TargetResult> = {};
      for (const t of targets) {
        const s = samples.get(`${c.name}/${t.name}`) ?? [];
        const rps = median(s.map((x) => x.rps));
        const mbps = median(s.map((x) => x.mbps));
        per[t.name] = {
          throughput: c.bytes ? mbps : rps,
          rps,
          mbps,
          p50Ms: median(s.map((x) => x.p50)),
          p99Ms: median(s.map((x) => x.p99)),
          cpuUsPerRequest: t.pid === undefined ? null : median(s.map((x) => x.cpuUsPerRequest)),
          rssMb: t.pid === undefined ? null : median(s.map((x) => x.rssMb)),
          errors: s.reduce((n, x) => n + x.errors, 0),
          rounds: s.length,
        };
      }
      const lmR = per.loopmesh!;
      const hpR = per.haproxy!;
      const dR = per.direct!;
      const ratios: CaseResult['ratios'] = {
        loopmeshVsHaproxy: lmR.throughput / hpR.throughput,
        loopmeshVsDirect: lmR.throughput / dR.throughput,
        haproxyVsDirect: hpR.throughput / dR.throughput,
        p99LoopmeshVsHaproxy: lmR.p99Ms / hpR.p99Ms,
        cpuLoopmeshVsHaproxy: (lmR.cpuUsPerRequest ?? NaN) / (hpR.cpuUsPerRequest ?? NaN),
      };
      const w = per[`loopmesh-w${scaleWorkers}`];
      if (w) ratios[`workers${scaleWorkers}VsOneWorker`] = w.throughput / lmR.throughput;
      return { name: c.name, label: c.label, unit: c.bytes ? 'MB/s' : 'requests/s', connections: c.connections, newConnectionPerRequest: c.close, targets: per, ratios };
    });

    const { stdout: nodeVersion } = await execa('node', ['--version']);
    const { stdout: nproc } = await execa('nproc');
    const cpuModel = osCpus()[0]?.model ?? 'unknown';
    const haproxyVersion = (await execa('haproxy', ['-v'], { reject: false })).stdout.split('\n')[0] ?? '';
    const nginxVersion = (await execa('nginx', ['-v'], { reject: false, all: true })).all?.trim() ?? '';
    const wrkVersion = (await execa('wrk', ['-v'], { reject: false, all: true })).all?.split('\n')[0]?.trim() ?? '';
    const machine = { nproc: Number(nproc), cpuModel, node: nodeVersion, haproxy: haproxyVersion, nginx: nginxVersion, wrk: wrkVersion, cli: useDist ? 'dist' : 'tsx' };

    out(`# loopmesh benchmarks  (${nproc} CPUs: ${cpuModel}; node ${nodeVersion}; ${rounds} interleaved rounds of ${seconds} s per case and target, median)`);
    out();
    out('## 1. HTTP through loopmesh vs HAProxy vs straight to nginx (one nginx worker, loopback)');
    out();
    out('| case | target | throughput | p50 ms | p99 ms | proxy CPU µs/req | proxy RSS MB | errors |');
    out('|---|---|---|---|---|---|---|---|');
    for (const r of results) {
      for (const t of targets) {
        const x = r.targets[t.name]!;
        out(`| ${r.label} | ${t.label} | ${fmt(x.throughput, r.unit === 'MB/s' ? 0 : 0)} ${r.unit} | ${fmt(x.p50Ms, 3)} | ${fmt(x.p99Ms, 3)} | ${fmt(x.cpuUsPerRequest, 1)} | ${fmt(x.rssMb, 1)} | ${x.errors} |`);
      }
    }
    out();
    out('| case | loopmesh / HAProxy | loopmesh / direct | HAProxy / direct | p99 loopmesh / HAProxy | CPU per request loopmesh / HAProxy |' + (scaling.available ? ` ${scaleWorkers} workers / 1 |` : ''));
    out('|---|---|---|---|---|---|' + (scaling.available ? '---|' : ''));
    for (const r of results) {
      out(`| ${r.label} | ${fmt(r.ratios.loopmeshVsHaproxy, 2)} | ${fmt(r.ratios.loopmeshVsDirect, 2)} | ${fmt(r.ratios.haproxyVsDirect, 2)} | ${fmt(r.ratios.p99LoopmeshVsHaproxy, 2)} | ${fmt(r.ratios.cpuLoopmeshVsHaproxy, 2)} |` + (scaling.available ? ` ${fmt(r.ratios[`workers${scaleWorkers}VsOneWorker`] ?? NaN, 2)} |` : ''));
    }
    if (scaling.note) {
      out();
      out(`Scaling: ${scaling.note}.`);
    }
    out();

    // The proxies are done: stopped before the convergence part, which has its own agent.
    for (const s of stops.splice(1).reverse()) await s.stop().catch(() => undefined);

    let conv: { appear: number[]; leave: number[] } | undefined;
    if (convergence) conv = await convergencePart(dir, consul, stops);

    if (jsonOut) {
      process.stdout.write(
        `${JSON.stringify({ machine, seconds, rounds, targets: targets.map(({ name, label }) => ({ name, label })), scaling, cases: results, convergence: conv ? { appearMs: conv.appear, leaveMs: conv.leave } : null }, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n`,
      );
    }
  } finally {
    for (const s of stops.reverse()) await s.stop().catch(() => undefined);
    await consul.close().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

async function convergencePart(dir: string, consul: TestConsul, stops: Stoppable[]): Promise<{ appear: number[]; leave: number[] }> {
  await writeFile(join(dir, 'hosts'), '127.0.0.1 localhost\n');
  const dnsPort = await freePort();
  const dns = `127.0.0.1:${dnsPort}`;
  const admin = `127.0.0.1:${await freePort()}`;
  const [cmd, args] = cli(['agent', '--consul', consul.url, '--run-dir', join(dir, 'run'), '--hosts-file', join(dir, 'hosts'), '--dns', dns, '--admin', admin, '--range', '127.78.0.0/16', '--kv-prefix', 'bench-convergence', '--log-level', 'warn']);
  const agent = execa(cmd, args, { reject: false, stdio: ['ignore', 'ignore', 'inherit'], cleanup: true });
  stops.push({
    stop: async () => {
      agent.kill('SIGTERM');
      await agent;
    },
  });
  await eventually(() => routes(admin).then(() => true).catch(() => false), 30_000, `the agent's admin at ${admin}`);

  out(`## 2. Convergence over ${changes} changes each (Consul HTTP API call -> effect seen on the node)`);
  out();
  const appear: number[] = [];
  const leave: number[] = [];
  const ids = [await startIdServer('bench-a'), await startIdServer('bench-b')];
  stops.push({ stop: () => Promise.all(ids.map((s) => s.close())) });
  for (let i = 0; i < changes; i++) {
    const name = `bench${i}`;
    const start = Date.now();
    await consul.register({ id: `${name}-a`, name, port: ids[0]!.port, ttlCheck: { passing: true } });
    const address = await eventually(async () => (await dig({ host: '127.0.0.1', port: dnsPort }, `${name}.local`, 'A')).answers[0], 10_000, `${name}.local in DNS`);
    await eventually(() => whoAnswers(address, ids[0]!.port, 500).then((id) => id === 'bench-a'), 10_000, `${name}.local accepting`);
    appear.push(Date.now() - start);
  }
  // Deregistration: two instances; drop one; time until 10 connections in a row avoid it.
  await consul.register({ id: 'move-a', name: 'move', port: ids[0]!.port, meta: { 'loopmesh-port': '7000' }, ttlCheck: { passing: true } });
  await consul.register({ id: 'move-b', name: 'move', port: ids[1]!.port, meta: { 'loopmesh-port': '7000' }, ttlCheck: { passing: true } });
  const move = await eventually(async () => (await routes(admin)).find((r) => r.service === 'move' && r.backends.length === 2), 10_000, 'move with two backends');
  for (let i = 0; i < changes; i++) {
    const gone = i % 2 === 0 ? 'move-b' : 'move-a';
    const goneId = gone === 'move-b' ? 'bench-b' : 'bench-a';
    const start = Date.now();
    await consul.deregister(gone);
    let clean = 0;
    let lastSeen = start;
    while (clean < 10 && Date.now() - start < 10_000) {
      const who = await whoAnswers(move.address, move.port, 500).catch(() => '');
      if (who === goneId) {
        lastSeen = Date.now();
        clean = 0;
      } else clean++;
    }
    leave.push(lastSeen - start);
    const port = gone === 'move-b' ? ids[1]!.port : ids[0]!.port;
    await consul.register({ id: gone, name: 'move', port, meta: { 'loopmesh-port': '7000' }, ttlCheck: { passing: true } });
    await eventually(async () => (await routes(admin)).find((r) => r.service === 'move')?.backends.length === 2, 10_000, 'move back to two backends');
  }
  out('| change | time to effect |');
  out('|---|---|');
  out(`| new service registered -> NAME.local resolves and accepts | ${summary(appear)} |`);
  out(`| instance deregistered -> last new connection that reached it | ${summary(leave)} |`);
  out();
  return { appear, leave };
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
