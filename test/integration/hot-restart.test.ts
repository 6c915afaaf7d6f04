import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { removeDir } from '../support/agent.js';
import { eventually, freePort, openConnection, startIdServer, steadyLoad, whoAnswers, type IdServer } from '../support/net.js';
import { dig } from '../support/resolve.js';

// `loopmesh balancer` is driven only by the files in its run dir, so these tests write balancer.json
// themselves; no Consul is involved. The processes are real, started as systemd or the lab would.

const main = join(import.meta.dirname, '..', '..', 'agent', 'cli', 'main.ts');

interface BalancerProcess {
  child: ChildProcess;
  exited: Promise<number | null>;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The log goes to a file: a successor inherits it, and no pipe of the test's waits on the successor. */
function startBalancer(entry: string, args: string[], log: string): BalancerProcess {
  const fd = openSync(log, 'a');
  const child = spawn(process.execPath, ['--import', 'tsx', entry, 'balancer', ...args], { stdio: ['ignore', fd, fd], env: { ...process.env, CONSUL_HTTP_ADDR: '' } });
  closeSync(fd);
  return { child, exited: new Promise((resolve) => child.once('exit', (code) => resolve(code))) };
}

async function logLines(log: string): Promise<Array<Record<string, unknown>>> {
  const text = await readFile(log, 'utf8').catch(() => '');
  return text.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** Serving, and done starting (a signal before the process set up its handlers would end it). */
async function untilStarted(b: BalancerProcess, log: string, address: string, port: number): Promise<void> {
  await eventually(async () => (await logLines(log)).some((l) => l.pid === b.child.pid && l.msg === 'loopmesh data plane started'), 15_000, 'the balancer started');
  assert.equal(await whoAnswers(address, port, 2000), 'web-a');
}

describe('hot restart of loopmesh balancer (SIGUSR2): a new process takes over the sockets', { timeout: 120_000 }, () => {
  let dir: string;
  let backend: IdServer;
  let port: number;
  let dnsPort: number;
  const address = '127.82.0.1';
  const started: BalancerProcess[] = [];
  const pids: number[] = [];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'loopmesh-hot-restart-'));
    backend = await startIdServer('web-a');
    port = await freePort();
    dnsPort = await freePort();
    const config = {
      version: 1,
      services: [{ service: 'web', name: 'web', fqdn: 'web.local', address, port, policy: 'round-robin', empty: 'reject', backends: [{ id: 'n1/web-a', address: '127.0.0.1', port: backend.port }] }],
    };
    await writeFile(join(dir, 'balancer.json'), JSON.stringify(config));
  });

  after(async () => {
    for (const b of started) b.child.kill('SIGKILL');
    for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
    await backend?.close();
    if (dir) await removeDir(dir);
  });

  const args = (): string[] => ['--run-dir', dir, '--hosts-file', 'off', '--dns', `127.0.0.1:${dnsPort}`, '--drain-timeout', '20'];

  test('under load: no new connection fails, the open one keeps working, the old process drains and exits, DNS answers from the new one', async (t) => {
    const log = join(dir, 'ok.log');
    const old = startBalancer(main, args(), log);
    started.push(old);
    await untilStarted(old, log, address, port);
    const open = await openConnection(address, port);
    const load = steadyLoad(address, port, 10);
    t.after(() => load.stop());
    await new Promise((r) => setTimeout(r, 300));

    old.child.kill('SIGUSR2');
    const handedOver = await eventually(async () => (await logLines(log)).find((l) => typeof l.successor === 'number'), 15_000, 'the old process saying which process serves now');
    const successor = handedOver.successor as number;
    pids.push(successor);
    assert.ok(alive(successor), `successor ${successor} runs`);
    assert.notEqual(successor, old.child.pid);
    await new Promise((r) => setTimeout(r, 500));
    const result = await load.stop();
    t.diagnostic(`hot restart under load: ${result.ok} new connections, ${result.failed.length} failed`);
    assert.deepEqual(result.failed, [], 'no new connection failed during the handover');
    assert.ok(result.ok > 30, `load ran (${result.ok} connections)`);

    // The open connection belongs to the old process, which waits for it before it exits.
    assert.equal(old.child.exitCode, null, 'the old process still drains its open connection');
    assert.equal(await open.ping('still here'), 'still here');
    open.socket.end();
    assert.equal(await Promise.race([old.exited, new Promise((r) => setTimeout(() => r('timeout'), 10_000))]), 0, 'the old process exits once its connection ended');

    // Only the successor is left, and it serves both the service and DNS.
    assert.equal(await whoAnswers(address, port, 2000), 'web-a');
    assert.deepEqual((await dig({ host: '127.0.0.1', port: dnsPort }, 'web.local', 'A')).answers, [address]);
    const lines = await logLines(log);
    assert.ok(lines.some((l) => l.pid === successor && l.hotRestart === true), 'the successor says it started on the inherited sockets');
    assert.ok(!lines.some((l) => l.pid === successor && l.code === 'LM_ERR_BALANCER_LISTEN'), 'the successor never had to bind (EADDRINUSE) itself');
    process.kill(successor, 'SIGTERM');
    await eventually(() => !alive(successor), 10_000, 'the successor stops on SIGTERM');
  });

  test('a successor that cannot start (a broken upgrade): the running process keeps serving, and a later hot restart works', async (t) => {
    const log = join(dir, 'broken.log');
    const entry = join(dir, 'entry.mjs');
    const good = `import ${JSON.stringify(pathToFileURL(main).href)};\n`;
    await writeFile(entry, good);
    const old = startBalancer(entry, args(), log);
    started.push(old);
    await untilStarted(old, log, address, port);

    await writeFile(entry, "process.stderr.write('this upgrade is broken\\n');\nprocess.exit(3);\n");
    const load = steadyLoad(address, port, 10);
    t.after(() => load.stop());
    old.child.kill('SIGUSR2');
    const failure = await eventually(async () => (await logLines(log)).find((l) => l.code === 'LM_ERR_HANDOVER'), 15_000, 'the handover failure logged');
    assert.match(String(failure.msg), /exited \(code 3\) before it served; this process keeps serving/);
    const during = await load.stop();
    t.diagnostic(`failed hot restart under load: ${during.ok} new connections, ${during.failed.length} failed`);
    assert.deepEqual(during.failed, []);
    assert.equal(old.child.exitCode, null, 'the old process still runs');
    assert.equal(await whoAnswers(address, port, 2000), 'web-a');
    assert.deepEqual((await dig({ host: '127.0.0.1', port: dnsPort }, 'web.local', 'A')).answers, [address], 'DNS still answers');

    await writeFile(entry, good);
    old.child.kill('SIGUSR2');
    const handedOver = await eventually(async () => (await logLines(log)).find((l) => typeof l.successor === 'number'), 15_000, 'a second hot restart succeeding');
    const successor = handedOver.successor as number;
    pids.push(successor);
    assert.equal(await Promise.race([old.exited, new Promise((r) => setTimeout(() => r('timeout'), 10_000))]), 0, 'the old process exits (no open connections to drain)');
    assert.equal(await whoAnswers(address, port, 2000), 'web-a', 'the successor serves');
    process.kill(successor, 'SIGTERM');
    await eventually(() => !alive(successor), 10_000, 'the successor stops on SIGTERM');
  });
});
