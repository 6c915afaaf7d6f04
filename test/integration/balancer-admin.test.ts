import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { closeSync, openSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { execa, type ResultPromise } from 'execa';
import type { ServiceSpec } from '../../agent/contract/balancer-config.js';
import { codes } from '../../agent/errors.js';
import type { StatusReport } from '../../agent/admin/report.js';
import { removeDir } from '../support/agent.js';
import { eventually, freePort, openConnection, startIdServer, type IdServer } from '../support/net.js';

/** `loopmesh balancer --admin`: split mode's live counters, from a real balancer process. */

const main = join(import.meta.dirname, '..', '..', 'agent', 'cli', 'main.ts');

function get(port: number, path: string, host = `127.0.0.1:${port}`): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, headers: { host } }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString('utf8')));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

function spec(service: string, address: string, port: number, backends: IdServer[]): ServiceSpec {
  return { service, name: service, fqdn: `${service}.local`, address, port, policy: 'round-robin', empty: 'reject', backends: backends.map((b) => ({ id: `node/${b.id}`, address: '127.0.0.1', port: b.port })) };
}

describe('loopmesh balancer --admin', { timeout: 90_000 }, () => {
  let base: string;
  let runDir: string;
  let adminPort: number;
  let balancer: ResultPromise | undefined;
  let web: IdServer;
  let blocker: Server | undefined;
  const webAddress = '127.77.0.10';
  let webPort: number;

  const writeConfig = (services: ServiceSpec[]): Promise<void> => writeFile(join(runDir, 'balancer.json'), JSON.stringify({ version: 1, services }));

  before(async () => {
    base = await mkdtemp(join(tmpdir(), 'loopmesh-balancer-admin-'));
    runDir = join(base, 'run');
    await mkdir(runDir, { mode: 0o700 });
    web = await startIdServer('web-a');
    webPort = await freePort(webAddress);
    await writeConfig([spec('web', webAddress, webPort, [web])]);
    adminPort = await freePort();
    balancer = execa('node', ['--import', 'tsx', main, 'balancer', '--run-dir', runDir, '--dns', 'off', '--hosts-file', 'off', '--admin', `127.0.0.1:${adminPort}`], { reject: false, stdio: ['ignore', 'ignore', 'pipe'], cleanup: true, env: { LOOPMESH_LOG_FORMAT: 'json' } });
    await eventually(async () => (await get(adminPort, '/health').catch(() => undefined))?.status === 200, 20_000, 'the balancer admin answers /health 200');
  });

  after(async () => {
    if (balancer && balancer.exitCode === null) {
      balancer.kill('SIGTERM');
      await balancer;
    }
    await web?.close();
    await new Promise<void>((resolve) => (blocker ? blocker.close(() => resolve()) : resolve()));
    if (base) await removeDir(base);
  });

  test('/v1/routes shows the live connection counts of the balancer process, and /metrics the same', async () => {
    const open = await Promise.all([1, 2, 3].map(() => openConnection(webAddress, webPort)));
    try {
      for (const c of open) assert.equal(c.greeting, 'web-a');
      const report = await eventually(async () => {
        const r = JSON.parse((await get(adminPort, '/v1/routes')).body) as StatusReport;
        return r.routes[0]?.activeConnections === 3 ? r : undefined;
      }, 5000, '3 active connections on web in /v1/routes');
      const route = report.routes[0]!;
      assert.equal(report.consul, null, 'a balancer process has no Consul');
      assert.equal(report.dataPlane, 'in-process');
      assert.equal(route.listening, true);
      assert.ok(route.totalConnections >= 3, `total ${route.totalConnections}`);
      assert.equal(route.backends[0]?.activeConnections, 3);
      assert.equal(report.health.status, 'ok');
      const metrics = (await get(adminPort, '/metrics')).body;
      assert.match(metrics, /^loopmesh_route_connections_active\{service="web"\} 3$/m);
      assert.match(metrics, /^loopmesh_route_listening\{service="web"\} 1$/m);
      assert.doesNotMatch(metrics, /loopmesh_consul_connected/);
      assert.match(metrics, /^loopmesh_route_connect_duration_seconds_count\{service="web"\} [1-9]\d*$/m);
      assert.match(metrics, /^# TYPE nodejs_eventloop_lag_seconds gauge$/m);
    } finally {
      for (const c of open) c.socket.destroy();
    }
  });

  test('`loopmesh status --admin` against the balancer prints the table', async () => {
    const r = await execa('node', ['--import', 'tsx', main, 'status', '--admin', `127.0.0.1:${adminPort}`], { reject: false });
    assert.equal(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, /consul none \(balancer process/);
    assert.match(r.stdout, /^health ok$/m);
    assert.match(r.stdout, new RegExp(`^web\\s+web\\.local\\s+${webAddress.replace(/\./g, '\\.')}:${webPort}\\s+round-robin\\s+1\\s+yes$`, 'm'));
  });

  test('a foreign Host header gets 421, as from the agent', async () => {
    const r = await get(adminPort, '/v1/routes', 'evil.example');
    assert.equal(r.status, 421);
  });

  test('a service whose port is taken: /health 503 naming the service', async () => {
    const takenPort = await freePort(webAddress);
    blocker = createServer();
    await new Promise<void>((resolve) => blocker!.listen(takenPort, webAddress, resolve));
    await writeConfig([spec('web', webAddress, webPort, [web]), spec('taken', webAddress, takenPort, [web])]);
    const health = await eventually(async () => {
      const r = await get(adminPort, '/health');
      return r.status === 503 ? (JSON.parse(r.body) as { status: string; reasons: Array<{ code: string; message: string }> }) : undefined;
    }, 10_000, '/health 503 once "taken" cannot listen');
    assert.equal(health.status, 'failing');
    assert.equal(health.reasons.length, 1, JSON.stringify(health.reasons));
    assert.equal(health.reasons[0]!.code, codes.balancerListen);
    assert.match(health.reasons[0]!.message, new RegExp(`service "taken" is not listening on ${webAddress.replace(/\./g, '\\.')}:${takenPort}: .*EADDRINUSE`));
  });

  test('--admin outside loopback without --admin-public: refused, exit 2', async () => {
    const port = await freePort();
    const r = await execa('node', ['--import', 'tsx', main, 'balancer', '--run-dir', runDir, '--dns', 'off', '--hosts-file', 'off', '--admin', `0.0.0.0:${port}`], { reject: false, timeout: 20_000, env: { LOOPMESH_LOG_FORMAT: 'json' } });
    assert.equal(r.exitCode, 2, r.stderr);
    assert.match(r.stderr, /--admin: "0\.0\.0\.0:\d+" is not a loopback address/);
  });

  test('hot restart (SIGUSR2): the successor takes the admin port over once the old process lets it go', async (t) => {
    const dir = join(base, 'hot');
    await mkdir(dir, { mode: 0o700 });
    const port = await freePort(webAddress);
    await writeFile(join(dir, 'balancer.json'), JSON.stringify({ version: 1, services: [spec('web', webAddress, port, [web])] }));
    const admin = await freePort();
    const log = join(base, 'hot.log');
    // The log goes to a file: the successor inherits it, and no pipe of the test waits on the successor.
    const fd = openSync(log, 'a');
    const old = spawn(process.execPath, ['--import', 'tsx', main, 'balancer', '--run-dir', dir, '--dns', 'off', '--hosts-file', 'off', '--admin', `127.0.0.1:${admin}`], { stdio: ['ignore', fd, fd], env: { ...process.env, LOOPMESH_LOG_FORMAT: 'json' } });
    closeSync(fd);
    const lines = async (): Promise<Array<Record<string, unknown>>> => (await readFile(log, 'utf8').catch(() => '')).split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
    let successor: number | undefined;
    t.after(() => {
      for (const pid of [old.pid, successor]) {
        try {
          if (pid) process.kill(pid, 'SIGKILL');
        } catch {
          // Already gone: the test stopped it.
        }
      }
    });
    await eventually(async () => (await lines()).some((l) => l.pid === old.pid && l.msg === 'loopmesh data plane started'), 20_000, 'the balancer started');
    assert.equal((await get(admin, '/health')).status, 200);
    old.kill('SIGUSR2');
    const taken = await eventually(async () => (await lines()).find((l) => l.msg === 'admin HTTP taken over from the previous process'), 20_000, 'the successor serving the admin');
    successor = taken.pid as number;
    assert.notEqual(successor, old.pid);
    const health = await get(admin, '/health');
    assert.equal(health.status, 200, health.body);
    assert.equal((JSON.parse((await get(admin, '/v1/routes')).body) as StatusReport).routes[0]?.listening, true);
    process.kill(successor, 'SIGTERM');
    const gone = (pid: number): boolean => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    };
    await eventually(() => gone(successor!), 10_000, 'the successor stops on SIGTERM');
  });
});
