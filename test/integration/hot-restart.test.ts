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
import { createServer, connect as tcpConnect, type Server } from 'node:net';
import { handoverEnv } from '../../agent/hot-restart/handover.js';

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
  /** The entry the balancer runs is a file the test rewrites, as an upgrade replaces the code on disk. */
  const good = (): string => `import ${JSON.stringify(pathToFileURL(main).href)};\n`;
  /** Puts `code` in place of the entry, sends SIGUSR2: a successor serves, the old process (no open connections) exits; then the successor is stopped. */
  async function handsOver(old: BalancerProcess, log: string, entry: string, code: string, withinMs: number): Promise<void> {
    await writeFile(entry, code);
    old.child.kill('SIGUSR2');
    const handedOver = await eventually(async () => (await logLines(log)).find((l) => typeof l.successor === 'number'), withinMs, 'a hot restart succeeding');
    const successor = handedOver.successor as number;
    pids.push(successor);
    assert.equal(await Promise.race([old.exited, new Promise((r) => setTimeout(() => r('timeout'), 10_000))]), 0, 'the old process exits (no open connections to drain)');
    assert.equal(await whoAnswers(address, port, 2000), 'web-a', 'the successor serves');
    process.kill(successor, 'SIGTERM');
    await eventually(() => !alive(successor), 10_000, 'the successor stops on SIGTERM');
  }
  async function startFromEntry(name: string, extra: string[] = []): Promise<{ b: BalancerProcess; log: string; entry: string }> {
    const log = join(dir, `${name}.log`);
    const entry = join(dir, `${name}-entry.mjs`);
    await writeFile(entry, good());
    const b = startBalancer(entry, [...args(), ...extra], log);
    started.push(b);
    await untilStarted(b, log, address, port);
    return { b, log, entry };
  }

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
    // Not left holding the port for the next test if an assertion below fails.
    t.after(() => { if (alive(successor)) process.kill(successor, 'SIGKILL'); });
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
    const { b: old, log, entry } = await startFromEntry('broken');

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

    await handsOver(old, log, entry, good(), 15_000);
  });

  test('--handover-timeout: a successor slower to start than it is given up on, the old process keeps serving; given longer, it takes over', async (t) => {
    // The successor runs the same command line: the timeout is read from it, so the first start sets it.
    const { b: old, log, entry } = await startFromEntry('slow', ['--handover-timeout', '2']);
    // As under CPU emulation: Node.js takes seconds to load loopmesh.
    // A dynamic import: a static one is loaded before the module's body runs.
    const slow = `await new Promise((r) => setTimeout(r, 4000));\nawait import(${JSON.stringify(pathToFileURL(main).href)});\n`;
    await writeFile(entry, slow);
    const load = steadyLoad(address, port, 10);
    t.after(() => load.stop());
    old.child.kill('SIGUSR2');
    const failure = await eventually(async () => (await logLines(log)).find((l) => l.code === 'LM_ERR_HANDOVER'), 15_000, 'the handover given up after 2 s');
    assert.match(String(failure.msg), /the successor did not serve within 2000 ms; this process keeps serving/);
    const during = await load.stop();
    assert.deepEqual(during.failed, [], 'nothing refused meanwhile');
    assert.equal(old.child.exitCode, null, 'the old process still runs');
    assert.equal(await whoAnswers(address, port, 2000), 'web-a');
    old.child.kill('SIGKILL');
    await old.exited;

    const { b: patient, log: log2, entry: entry2 } = await startFromEntry('slow-ok', ['--handover-timeout', '30']);
    await handsOver(patient, log2, entry2, slow, 40_000);
  });

  // Node's wrapper server accepts on a handed-over socket the moment it arrives, before the `end`
  // message; a connection accepted then once hung unanswered (1 in ~300 under load). The test drives
  // the protocol itself, so connections land in exactly that window.
  test('a connection accepted while the sockets are still arriving is held and served, not left hanging', async () => {
    const handover = join(import.meta.dirname, '..', '..', 'agent', 'hot-restart', 'handover.ts');
    const script = join(dir, 'successor.mts');
    await writeFile(script, [
      `import { receiveHandover } from ${JSON.stringify(pathToFileURL(handover).href)};`,
      'const inherited = await receiveHandover(10_000);',
      "const held = inherited?.takeTcp('window')?.adopt() ?? [];",
      "for (const socket of held) { socket.resume(); socket.end('held\\n'); }",
      "process.send?.({ type: 'held', count: held.length }, () => process.disconnect());",
      '',
    ].join('\n'));
    const server: Server = createServer(() => assert.fail('the predecessor accepts nothing after handing the socket over'));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port: windowPort } = server.address() as { port: number };
    const child = spawn(process.execPath, ['--import', 'tsx', script], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env: { ...process.env, [handoverEnv]: String(process.pid) } });
    try {
      const reply = new Promise<unknown>((resolve) => child.on('message', (m: unknown) => { if ((m as { type?: string }).type === 'held') resolve(m); }));
      await new Promise<void>((resolve) => child.once('message', () => resolve())); // hello
      await new Promise<void>((resolve, reject) => child.send({ type: 'socket', kind: 'tcp', key: 'window' }, server, (err) => (err ? reject(err) : resolve())));
      // Only the successor's copy accepts now.
      await new Promise<void>((resolve) => server.close(() => resolve()));
      const answers = Array.from({ length: 3 }, () => new Promise<string>((resolve) => {
        const socket = tcpConnect(windowPort, '127.0.0.1');
        let text = '';
        socket.setEncoding('utf8');
        socket.on('data', (d: string) => { text += d; });
        socket.on('close', () => resolve(text));
        socket.on('error', () => resolve(`error after ${JSON.stringify(text)}`));
        socket.setTimeout(5000, () => socket.destroy());
      }));
      await new Promise((r) => setTimeout(r, 300));
      child.send({ type: 'end', sockets: 1, config: null });
      assert.deepEqual(await reply, { type: 'held', count: 3 }, 'the successor held the 3 connections that came before the end message');
      assert.deepEqual(await Promise.all(answers), ['held\n', 'held\n', 'held\n']);
    } finally {
      child.kill('SIGKILL');
    }
  });
});
