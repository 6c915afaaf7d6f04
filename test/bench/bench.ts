/**
 * Benchmarks (npm run bench): a real Consul dev agent, the real loopmesh CLI as its own process,
 * real nginx backends and wrk. Prints figures; asserts nothing beyond "it ran". Bounded in time.
 *
 *   1. HTTP through the balancer vs straight to nginx (wrk: requests/s, p50, p99).
 *   2. Convergence: a new service registered -> NAME.local answers in DNS and accepts connections;
 *      an instance deregistered -> no new connection reaches it. N changes each, p50 / p99 / max.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers } from '../support/net.js';
import { dig } from '../support/resolve.js';

const seconds = Number(process.env.BENCH_SECONDS ?? 10);
const connections = Number(process.env.BENCH_CONNECTIONS ?? 50);
const changes = Number(process.env.BENCH_CHANGES ?? 20);
const root = join(import.meta.dirname, '..', '..');

interface Route {
  service: string;
  address: string;
  port: number;
  backends: Array<{ id: string }>;
}

function out(line = ''): void {
  process.stdout.write(`${line}\n`);
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

function summary(samples: number[]): string {
  const s = [...samples].sort((x, y) => x - y);
  return `n=${s.length}  p50=${percentile(s, 50)} ms  p99=${percentile(s, 99)} ms  max=${s[s.length - 1]} ms`;
}

async function routes(admin: string): Promise<Route[]> {
  const res = await fetch(`http://${admin}/v1/routes`, { signal: AbortSignal.timeout(2000) });
  const body = (await res.json()) as { routes?: Route[] };
  return body.routes ?? [];
}

interface WrkResult {
  rps: number;
  p50: string;
  p99: string;
  errors: string;
}

async function wrk(url: string): Promise<WrkResult> {
  const r = await execa('wrk', ['-t2', `-c${connections}`, `-d${seconds}s`, '--latency', url], { timeout: (seconds + 30) * 1000 });
  const text = r.stdout;
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(text)?.[1] ?? NaN);
  const p50 = /\s50%\s+(\S+)/.exec(text)?.[1] ?? '?';
  const p99 = /\s99%\s+(\S+)/.exec(text)?.[1] ?? '?';
  const errors = /Socket errors:[^\n]*/.exec(text)?.[0] ?? /Non-2xx[^\n]*/.exec(text)?.[0] ?? 'none';
  return { rps, p50, p99, errors };
}

/** Wrapped: an execa process is a thenable, and an async function would wait for it to exit. */
async function startNginx(dir: string, ports: number[]): Promise<{ process: ResultPromise }> {
  const servers = ports.map((p) => `server { listen 127.0.0.1:${p}; access_log off; location / { return 200 "nginx ${p}\\n"; } }`).join('\n');
  const conf = join(dir, 'nginx.conf');
  await writeFile(
    conf,
    `worker_processes 1;\ndaemon off;\npid ${dir}/nginx.pid;\nerror_log ${dir}/nginx-error.log;\nevents { worker_connections 1024; }\nhttp {\n client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};\n keepalive_requests 100000;\n${servers}\n}\n`,
  );
  const nginx = execa('nginx', ['-c', conf, '-p', dir], { reject: false, stdio: 'ignore', cleanup: true });
  await eventually(() => fetch(`http://127.0.0.1:${ports[0]}/`).then((r) => r.ok), 10_000, 'nginx');
  return { process: nginx };
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-bench-'));
  const consul = await TestConsul.start();
  const stops: Array<() => Promise<unknown>> = [];
  try {
    const nginxPorts = [await freePort(), await freePort()];
    const nginx = (await startNginx(dir, nginxPorts)).process;
    stops.push(async () => {
      nginx.kill('SIGQUIT');
      await nginx;
    });
    const webPort = await freePort();
    for (const [i, port] of nginxPorts.entries()) {
      await consul.register({ id: `web-${i + 1}`, name: 'web', port, meta: { 'loopmesh-port': String(webPort) }, ttlCheck: { passing: true } });
    }
    await writeFile(join(dir, 'hosts'), '127.0.0.1 localhost\n');
    const dnsPort = await freePort();
    const dns = `127.0.0.1:${dnsPort}`;
    const admin = `127.0.0.1:${await freePort()}`;
    const agent = execa(
      'node',
      [join(root, 'dist', 'agent', 'cli', 'main.js'), 'agent', '--consul', consul.url, '--run-dir', join(dir, 'run'), '--hosts-file', join(dir, 'hosts'), '--dns', dns, '--admin', admin, '--range', '127.79.0.0/16', '--log-level', 'warn'],
      { reject: false, stdio: ['ignore', 'ignore', 'inherit'], cleanup: true },
    );
    stops.push(async () => {
      agent.kill('SIGTERM');
      await agent;
    });
    const web = await eventually(async () => (await routes(admin)).find((r) => r.service === 'web' && r.backends.length === 2), 20_000, 'the web route with two backends');

    const { stdout: nodeVersion } = await execa('node', ['--version']);
    const { stdout: cpus } = await execa('nproc');
    out(`# loopmesh benchmarks  (node ${nodeVersion}, ${cpus} CPUs, wrk -t2 -c${connections} -d${seconds}s, nginx 1 worker per run)`);
    out();
    out('## 1. HTTP through the balancer vs straight to nginx');
    out();
    out('| path | requests/s | p50 | p99 | errors |');
    out('|---|---|---|---|---|');
    const direct = await wrk(`http://127.0.0.1:${nginxPorts[0]}/`);
    out(`| direct to one nginx (127.0.0.1:${nginxPorts[0]}) | ${direct.rps.toFixed(0)} | ${direct.p50} | ${direct.p99} | ${direct.errors} |`);
    const via = await wrk(`http://${web.address}:${web.port}/`);
    out(`| web.local via loopmesh (${web.address}:${web.port}, 2 backends) | ${via.rps.toFixed(0)} | ${via.p50} | ${via.p99} | ${via.errors} |`);
    const freshDuration = `-d${Math.max(2, Math.floor(seconds / 2))}s`;
    for (const [label, url] of [
      ['direct to one nginx, a new TCP connection per request (-c10)', `http://127.0.0.1:${nginxPorts[0]}/`],
      ['web.local via loopmesh, a new TCP connection per request (-c10)', `http://${web.address}:${web.port}/`],
    ] as const) {
      const fresh = await execa('wrk', ['-t1', '-c10', freshDuration, '--latency', '-H', 'Connection: close', url], { timeout: (seconds + 30) * 1000 });
      const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(fresh.stdout)?.[1] ?? NaN);
      const p50 = /\s50%\s+(\S+)/.exec(fresh.stdout)?.[1] ?? '?';
      const p99 = /\s99%\s+(\S+)/.exec(fresh.stdout)?.[1] ?? '?';
      out(`| ${label} | ${rps.toFixed(0)} | ${p50} | ${p99} | ${/Socket errors:[^\n]*/.exec(fresh.stdout)?.[0] ?? 'none'} |`);
    }
    out();

    out(`## 2. Convergence over ${changes} changes each (Consul HTTP API call -> effect seen on the node)`);
    out();
    const appear: number[] = [];
    const leave: number[] = [];
    const ids = [await startIdServer('bench-a'), await startIdServer('bench-b')];
    stops.push(() => Promise.all(ids.map((s) => s.close())));
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
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => undefined);
    await consul.close();
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
