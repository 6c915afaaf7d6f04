import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import type { ServiceSpec } from '../../agent/contract/balancer-config.js';
import type { WorkersStatusReport } from '../../agent/workers/merge.js';
import { hostsPrelude, removeDir } from '../support/agent.js';
import { dig } from '../support/resolve.js';
import { eventually, freePort, startIdServer, type IdServer } from '../support/net.js';

/** `loopmesh balancer --workers N`: real processes sharing real listening sockets. */

const main = join(import.meta.dirname, '..', '..', 'agent', 'cli', 'main.ts');

function get(port: number, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, timeout: 10_000 }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString('utf8')));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${path}: no answer within 10 s`)));
    req.on('error', reject);
    req.end();
  });
}

async function routes(admin: number): Promise<WorkersStatusReport> {
  return JSON.parse((await get(admin, '/v1/routes')).body) as WorkersStatusReport;
}

function spec(service: string, address: string, port: number, backend: IdServer): ServiceSpec {
  return { service, name: service, fqdn: `${service}.local`, address, port, policy: 'round-robin', empty: 'reject', backends: [{ id: `node/${backend.id}`, address: '127.0.0.1', port: backend.port }] };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** One connection through the balancer: connect, read the backend's greeting line, close. */
function once(host: string, port: number): Promise<'ok' | string> {
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    let data = '';
    let connected = false;
    const timer = setTimeout(() => finish('timeout: no greeting within 5 s'), 5000);
    const finish = (outcome: string): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(outcome);
    };
    socket.on('connect', () => (connected = true));
    socket.on('data', (c: Buffer) => {
      data += c.toString();
      if (data.includes('\n')) finish('ok');
    });
    socket.on('error', (err: NodeJS.ErrnoException) => finish(`${connected ? 'after connect' : 'connect'}: ${err.code ?? err.message}`));
    socket.on('close', () => finish(connected ? 'after connect: closed before the greeting' : 'connect: closed'));
  });
}

interface Outcome {
  at: number;
  result: string;
}

/** `clients` loops opening new connections back to back until stopped. */
function load(host: string, port: number, clients: number): { stop: () => Promise<Outcome[]> } {
  let running = true;
  const outcomes: Outcome[] = [];
  const loops = Array.from({ length: clients }, async () => {
    while (running) {
      const at = Date.now();
      outcomes.push({ at, result: await once(host, port) });
    }
  });
  return {
    stop: async () => {
      running = false;
      await Promise.all(loops);
      return outcomes;
    },
  };
}

describe('loopmesh balancer --workers', { timeout: 180_000 }, () => {
  let base: string;
  let runDir: string;
  let admin: number;
  let web: IdServer;
  let balancer: ChildProcess | undefined;
  let log: string;
  const address = '127.77.0.20';
  let port: number;
  const extraPids = new Set<number>();

  const lines = async (): Promise<Array<Record<string, unknown>>> =>
    (await readFile(log, 'utf8').catch(() => ''))
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);

  before(async () => {
    base = await mkdtemp(join(tmpdir(), 'loopmesh-workers-'));
    runDir = join(base, 'run');
    await mkdir(runDir, { mode: 0o700 });
    web = await startIdServer('web-a');
    port = await freePort(address);
    await writeFile(join(runDir, 'balancer.json'), JSON.stringify({ version: 1, services: [spec('web', address, port, web)] }));
    admin = await freePort();
    log = join(base, 'balancer.log');
    const fd = openSync(log, 'a');
    balancer = spawn(process.execPath, ['--import', 'tsx', main, 'balancer', '--run-dir', runDir, '--dns', 'off', '--hosts-file', 'off', '--admin', `127.0.0.1:${admin}`, '--workers', '2', '--drain-timeout', '5'], {
      stdio: ['ignore', fd, fd],
      env: { ...process.env, LOOPMESH_LOG_FORMAT: 'json' },
    });
    closeSync(fd);
    await eventually(async () => (await get(admin, '/health').catch(() => undefined))?.status === 200, 40_000, 'the supervisor admin answers /health 200 (both workers serve)');
  });

  after(async () => {
    const pids = new Set<number>(extraPids);
    if (balancer?.pid) {
      const report = await routes(admin).catch(() => undefined);
      for (const w of report?.workers ?? []) pids.add(w.pid);
      if (balancer.exitCode === null) balancer.kill('SIGTERM');
      await eventually(() => balancer?.exitCode !== null || balancer.signalCode !== null, 20_000, 'the supervisor stops on SIGTERM').catch(() => balancer?.kill('SIGKILL'));
    }
    for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
    await web?.close();
    if (base) await removeDir(base);
  });

  test('connections spread over both workers; /v1/routes and /metrics are the sums', async (t) => {
    const before = await routes(admin);
    assert.equal(before.workers.length, 2);
    const pids = before.workers.map((w) => w.pid);
    assert.ok(pids.every((p) => p !== balancer?.pid && alive(p)), `two worker processes apart from the supervisor: ${pids.join(', ')}`);
    assert.notEqual(pids[0], pids[1]);
    const startTotal = before.routes[0]?.totalConnections ?? 0;
    // Held open at once, so that both workers are asked to accept.
    const outcomes = await Promise.all(Array.from({ length: 200 }, () => once(address, port)));
    assert.deepEqual(outcomes.filter((o) => o !== 'ok'), [], 'every connection got the greeting');
    const report = await eventually(async () => {
      const r = await routes(admin);
      return r.routes[0]?.totalConnections === startTotal + 200 ? r : undefined;
    }, 10_000, '200 more connections in /v1/routes');
    const perWorker = report.workers.map((w) => w.totalConnections);
    assert.ok(perWorker.every((n) => n > 0), `both workers accepted connections: ${perWorker.join(' + ')}`);
    assert.equal(perWorker.reduce((a, b) => a + b, 0), report.routes[0]!.totalConnections, 'the route total is the sum of the workers');
    assert.equal(report.routes[0]!.backends[0]!.totalConnections, report.routes[0]!.totalConnections, 'the backend total is summed too');
    assert.equal(report.routes[0]!.listening, true);
    assert.equal(report.health.status, 'ok');
    const metrics = (await get(admin, '/metrics')).body;
    assert.match(metrics, new RegExp(`^loopmesh_route_connections_total\\{service="web"\\} ${report.routes[0]!.totalConnections}$`, 'm'));
    assert.match(metrics, /^loopmesh_healthy 1$/m);
    // The connect histogram of the workers summed: every forwarded connection once, in whichever worker.
    const connects = report.routes[0]!.connectLatency;
    assert.equal(connects?.count, report.routes[0]!.backends[0]!.totalConnections, 'each forwarded connection is in the merged histogram once');
    assert.match(metrics, new RegExp(`^loopmesh_route_connect_duration_seconds_count\\{service="web"\\} ${connects?.count}$`, 'm'));
    assert.match(metrics, new RegExp(`^loopmesh_route_connect_duration_seconds_bucket\\{service="web",le="\\+Inf"\\} ${connects?.count}$`, 'm'));
    assert.match(metrics, /^process_resident_memory_bytes \d+/m);
    t.diagnostic(`spread of 200 connections over 2 workers: ${perWorker.join(' + ')} (cumulative)`);
  });

  test('kill -9 of one worker under a stream of new connections: none refused, a replacement serves', async (t) => {
    const before = await routes(admin);
    const victim = before.workers[1]!.pid;
    const survivor = before.workers[0]!.pid;
    const stream = load(address, port, 2);
    await new Promise((r) => setTimeout(r, 1000));
    const killedAt = Date.now();
    process.kill(victim, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 4000));
    const outcomes = await stream.stop();
    const failed = outcomes.filter((o) => o.result !== 'ok');
    const refused = failed.filter((o) => o.result.startsWith('connect'));
    // The connections the killed worker held at that instant are lost with it; no new one may fail.
    const afterKill = failed.filter((o) => o.at > killedAt + 100);
    t.diagnostic(`kill -9 of a worker: ${outcomes.length} connections in 5 s, ${refused.length} refused, ${failed.length - refused.length} cut (held by the killed worker), ${afterKill.length} failed after it`);
    assert.deepEqual(refused, [], 'no connection refused');
    assert.deepEqual(afterKill, [], 'no connection opened after the kill failed');
    assert.ok(failed.length <= 2, `at most the 2 in-flight connections of the killed worker were cut: ${JSON.stringify(failed)}`);
    assert.ok(outcomes.length > 50, `the stream kept going: ${outcomes.length}`);
    const report = await eventually(async () => {
      const r = await routes(admin);
      return r.health.status === 'ok' && r.workers.length === 2 && !r.workers.some((w) => w.pid === victim) ? r : undefined;
    }, 30_000, 'a replacement worker serving and /health ok');
    const replacement = report.workers.find((w) => w.pid !== survivor)!;
    assert.equal(replacement.index, 1);
    assert.equal(replacement.restarts, 1);
    assert.ok(alive(replacement.pid));
    assert.ok(
      (await lines()).some((l) => l.code === 'LM_ERR_WORKER_DOWN' && typeof l.msg === 'string' && l.msg.includes(`pid ${victim}`) && l.msg.includes('killed by SIGKILL')),
      'the supervisor logged the dead worker',
    );
    // The replacement serves: connections reach it.
    const start = replacement.totalConnections;
    await eventually(async () => {
      await Promise.all(Array.from({ length: 20 }, () => once(address, port)));
      const r = await routes(admin);
      return (r.workers.find((w) => w.pid === replacement.pid)?.totalConnections ?? 0) > start;
    }, 20_000, 'the replacement accepts connections');
  });

  test('SIGUSR2: every worker replaced by a new one under load, none refused, the supervisor stays', async (t) => {
    const before = await routes(admin);
    const oldPids = before.workers.map((w) => w.pid);
    const totalBefore = before.routes[0]!.totalConnections;
    const stream = load(address, port, 2);
    await new Promise((r) => setTimeout(r, 500));
    const t0 = Date.now();
    balancer!.kill('SIGUSR2');
    const done = await eventually(async () => (await lines()).find((l) => typeof l.msg === 'string' && l.msg.startsWith('hot restart done')), 60_000, 'the hot restart of the workers done');
    const took = Number(done.time) - t0;
    await new Promise((r) => setTimeout(r, 1000));
    const outcomes = await stream.stop();
    const failed = outcomes.filter((o) => o.result !== 'ok');
    t.diagnostic(`SIGUSR2 with 2 workers: ${outcomes.length} connections, ${failed.length} failed; restart took ${took} ms`);
    assert.deepEqual(failed, [], 'no connection refused or cut during the hot restart');
    const after = await eventually(async () => {
      const r = await routes(admin);
      return r.workers.filter((w) => w.state === 'serving').length === 2 && r.workers.every((w) => w.state === 'serving') ? r : undefined;
    }, 20_000, 'two serving workers, the old ones drained');
    for (const w of after.workers) assert.ok(!oldPids.includes(w.pid), `worker ${w.index} has a new pid (${w.pid}; old ${oldPids.join(', ')})`);
    await eventually(() => oldPids.every((p) => !alive(p)), 20_000, 'the old workers exited after draining');
    assert.equal(balancer!.exitCode, null, 'the supervisor still runs');
    assert.ok(alive(balancer!.pid!), 'same supervisor pid');
    assert.equal(after.health.status, 'ok');
    assert.ok(after.routes[0]!.totalConnections >= totalBefore + outcomes.length, `the totals kept the old workers' counts: ${after.routes[0]!.totalConnections} >= ${totalBefore} + ${outcomes.length}`);
  });

  test('SIGTERM: the supervisor and every worker stop', async () => {
    const pids = (await routes(admin)).workers.map((w) => w.pid);
    balancer!.kill('SIGTERM');
    await eventually(() => balancer!.exitCode !== null, 20_000, 'the supervisor exits');
    assert.equal(balancer!.exitCode, 0);
    await eventually(() => pids.every((p) => !alive(p)), 10_000, 'every worker exited');
  });

  for (const bad of ['0', 'x', '65']) {
    test(`--workers ${bad}: a clear message, exit 2`, async () => {
      const r = await execa('node', ['--import', 'tsx', main, 'balancer', '--run-dir', runDir, '--dns', 'off', '--hosts-file', 'off', '--workers', bad], { reject: false, timeout: 20_000 });
      assert.equal(r.exitCode, 2, r.stderr);
      assert.match(r.stderr, new RegExp(`--workers: expected a whole number from 1 to 64, or "auto" \\(one per CPU\\), got "${bad}"`));
    });
  }
});

describe('loopmesh balancer --workers 2 with DNS and the hosts file', { timeout: 120_000 }, () => {
  let base: string;
  let runDir: string;
  let hosts: string;
  let admin: number;
  let dnsPort: number;
  let web: IdServer;
  let balancer: ChildProcess | undefined;
  const address = '127.77.0.21';
  let webPort: number;

  before(async () => {
    base = await mkdtemp(join(tmpdir(), 'loopmesh-workers-dns-'));
    runDir = join(base, 'run');
    await mkdir(runDir, { mode: 0o700 });
    hosts = join(base, 'hosts');
    await writeFile(hosts, hostsPrelude);
    web = await startIdServer('web-b');
    webPort = await freePort(address);
    await writeFile(join(runDir, 'balancer.json'), JSON.stringify({ version: 1, services: [spec('web', address, webPort, web)] }));
    await writeFile(join(runDir, 'hosts'), `${address}\tweb.local\n`);
    admin = await freePort();
    dnsPort = await freePort();
    balancer = spawn(process.execPath, ['--import', 'tsx', main, 'balancer', '--run-dir', runDir, '--dns', `127.0.0.1:${dnsPort}`, '--hosts-file', hosts, '--admin', `127.0.0.1:${admin}`, '--workers', '2', '--drain-timeout', '2'], {
      stdio: 'ignore',
      env: { ...process.env, LOOPMESH_LOG_FORMAT: 'json' },
    });
    await eventually(async () => (await get(admin, '/health').catch(() => undefined))?.status === 200, 40_000, 'the supervisor admin answers /health 200');
  });

  after(async () => {
    const report = await routes(admin).catch(() => undefined);
    if (balancer && balancer.exitCode === null) balancer.kill('SIGTERM');
    await eventually(() => balancer?.exitCode !== null || balancer.signalCode !== null, 20_000, 'the supervisor stops').catch(() => balancer?.kill('SIGKILL'));
    for (const w of report?.workers ?? []) if (alive(w.pid)) process.kill(w.pid, 'SIGKILL');
    await web?.close();
    if (base) await removeDir(base);
  });

  test('DNS over UDP and TCP answers from the shared sockets; the counters are summed', async () => {
    for (let i = 0; i < 10; i++) {
      const udp = await dig({ host: '127.0.0.1', port: dnsPort }, 'web.local');
      assert.deepEqual(udp.answers, [address], `udp query ${i}: ${udp.status}`);
      const tcp = await dig({ host: '127.0.0.1', port: dnsPort }, 'web.local', 'A', ['+tcp']);
      assert.deepEqual(tcp.answers, [address], `tcp query ${i}: ${tcp.status}`);
    }
    const report = await routes(admin);
    assert.ok((report.dns?.answered ?? 0) >= 20, `20 answers summed over the workers: ${JSON.stringify(report.dns)}`);
  });

  test('worker 0 writes the hosts block; its replacement after kill -9 keeps writing it (same owner, not "another agent")', async () => {
    const before = await routes(admin);
    const first = before.workers.find((w) => w.index === 0)!;
    await eventually(async () => (await readFile(hosts, 'utf8')).includes(`pid=${first.pid}`), 10_000, 'the block marked with worker 0\'s pid');
    assert.match(await readFile(hosts, 'utf8'), new RegExp(`^${address.replace(/\./g, '\\.')}\\s+web\\.local$`, 'm'));
    process.kill(first.pid, 'SIGKILL');
    const report = await eventually(async () => {
      const r = await routes(admin);
      const zero = r.workers.find((w) => w.index === 0);
      return r.health.status === 'ok' && zero && zero.pid !== first.pid ? r : undefined;
    }, 30_000, 'a new worker 0 and /health ok');
    const second = report.workers.find((w) => w.index === 0)!;
    // The data plane reads the hosts file when balancer.json changes (the renderer writes both).
    await writeFile(join(runDir, 'hosts'), `${address}\tweb.local\n${address}\twww.web.local\n`);
    await writeFile(join(runDir, 'balancer.json'), JSON.stringify({ version: 1, services: [spec('web', address, webPort, web), spec('www', address, await freePort(address), web)] }));
    await eventually(async () => {
      const text = await readFile(hosts, 'utf8');
      return text.includes(`pid=${second.pid}`) && text.includes('www.web.local');
    }, 15_000, 'the new worker 0 rewrote the block with its pid');
    const after = await routes(admin);
    assert.deepEqual(after.problems.filter((p) => p.code === 'LM_ERR_HOSTS_OWNED'), []);
    assert.ok((await readFile(hosts, 'utf8')).startsWith(hostsPrelude), 'the rest of the file kept');
  });
});
