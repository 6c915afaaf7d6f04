import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rename, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import type { BalancePolicy, ServiceSpec } from '../../agent/contract/balancer-config.js';
import type { StatusReport } from '../../agent/admin/report.js';
import { removeDir } from '../support/agent.js';
import { eventually, freePort, startIdServer, type IdServer } from '../support/net.js';

/**
 * Zero drop under change: 200 reloads of balancer.json (backends, weights, policies, splits and a
 * service coming and going), a worker killed with SIGKILL and a hot restart, while clients keep
 * opening connections and echoing data through the balancer. Counts failed connects and cut streams.
 */

const main = join(import.meta.dirname, '..', '..', 'agent', 'cli', 'main.ts');
const reloads = Number(process.env.ZERO_DROP_RELOADS ?? 200);
const policies: BalancePolicy[] = ['p2c-ewma', 'least-conn', 'round-robin'];

interface Tally {
  ok: number;
  failedConnects: string[];
  cutStreams: string[];
  /** Streams cut while a worker was being killed with SIGKILL: those that lived in it cannot survive. */
  cutByKill: string[];
  killing: boolean;
}

/** One connection: the greeting, `rounds` echoes of random bytes, a half-close and a clean end. */
function exchange(address: string, port: number, rounds: number): Promise<'ok' | { connect: string } | { cut: string }> {
  return new Promise((resolve) => {
    const socket = connect({ host: address, port });
    let greeted = false;
    let expected = '';
    let received = '';
    let round = 0;
    let settled = false;
    const finish = (result: 'ok' | { connect: string } | { cut: string }): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => finish(greeted ? { cut: `stalled at round ${round}` } : { connect: 'no greeting within 5 s' }), 5000);
    const send = (): void => {
      expected = `${randomBytes(256).toString('hex')}\n`;
      received = '';
      socket.write(expected);
    };
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      if (!greeted) {
        const nl = chunk.indexOf('\n');
        if (nl < 0) return;
        greeted = true;
        chunk = chunk.slice(nl + 1);
        send();
      }
      received += chunk;
      if (received.length < expected.length) return;
      if (received !== expected) return finish({ cut: `round ${round}: echo differs` });
      round++;
      if (round < rounds) send();
      else socket.end();
    });
    socket.on('end', () => finish(round >= rounds ? 'ok' : { cut: `ended after ${round} of ${rounds} rounds` }));
    socket.on('error', (err: NodeJS.ErrnoException) => finish(greeted ? { cut: `${err.code ?? err.message} at round ${round}` } : { connect: err.code ?? err.message }));
  });
}

function clientLoop(address: string, port: number, tally: Tally, running: () => boolean): Promise<void> {
  return (async () => {
    while (running()) {
      const result = await exchange(address, port, 4);
      if (result === 'ok') tally.ok++;
      else if ('connect' in result) tally.failedConnects.push(result.connect);
      else (tally.killing ? tally.cutByKill : tally.cutStreams).push(result.cut);
    }
  })();
}

function workersSupported(): boolean {
  const help = execFileSync('node', ['--import', 'tsx', main, 'balancer', '--help'], { encoding: 'utf8' });
  return help.includes('--workers');
}

function childPids(pid: number): number[] {
  try {
    return execFileSync('pgrep', ['-P', String(pid)], { encoding: 'utf8' }).split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

test(`zero drop: ${reloads} reloads, a worker killed and a hot restart under steady connections`, { timeout: 180_000 }, async (t) => {
  const base = await mkdtemp(join(tmpdir(), 'loopmesh-zero-drop-'));
  const runDir = join(base, 'run');
  await mkdir(runDir, { mode: 0o700 });
  const backends: IdServer[] = await Promise.all(['a', 'b', 'c'].map((id) => startIdServer(id)));
  const webAddress = '127.77.0.30';
  const extraAddress = '127.77.0.31';
  const webPort = await freePort(webAddress);
  const extraPort = await freePort(extraAddress);
  const adminPort = await freePort();
  t.after(async () => {
    await Promise.all(backends.map((b) => b.close()));
    await removeDir(base);
  });

  let written = 0;
  const write = async (services: ServiceSpec[]): Promise<void> => {
    const temp = join(runDir, `.balancer.json.${written}`);
    await writeFile(temp, JSON.stringify({ version: 1, services }), { mode: 0o600 });
    await rename(temp, join(runDir, 'balancer.json'));
    written++;
  };
  const webSpec = (i: number): ServiceSpec => {
    // A non-empty subset of the three, random weights and policy, and every few reloads a split.
    const chosen = backends.filter((_, k) => ((i + 1) >> k) & 1 || (i % 7 === k));
    const use = chosen.length > 0 ? chosen : backends;
    const canary = use[i % use.length]!.id;
    const splitWeight = [0, 20, 50, 100][i % 4]!;
    return {
      service: 'web',
      name: 'web',
      fqdn: 'web.local',
      address: webAddress,
      port: webPort,
      policy: policies[i % policies.length]!,
      empty: 'reject',
      ...(i % 3 === 0 ? { split: [{ name: 'canary', weight: splitWeight }, { name: '', weight: 100 - splitWeight }] } : {}),
      backends: use.map((b, k) => ({ id: `node/${b.id}`, address: '127.0.0.1', port: b.port, weight: 1 + ((i + k) % 5), subset: b.id === canary ? 'canary' : '' })),
    };
  };
  const extraSpec: ServiceSpec = { service: 'extra', name: 'extra', fqdn: 'extra.local', address: extraAddress, port: extraPort, policy: 'round-robin', empty: 'reject', backends: [{ id: 'node/a', address: '127.0.0.1', port: backends[0]!.port }] };
  await write([webSpec(0)]);

  const workers = workersSupported();
  const args = ['--import', 'tsx', main, 'balancer', '--run-dir', runDir, '--dns', 'off', '--hosts-file', 'off', '--admin', `127.0.0.1:${adminPort}`, ...(workers ? ['--workers', '2'] : [])];
  const balancer = execa('node', args, { reject: false, stdio: ['ignore', 'ignore', 'pipe'], cleanup: true, env: { LOOPMESH_LOG_FORMAT: 'json' } });
  let stderr = '';
  balancer.stderr?.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-20_000)));
  t.after(async () => {
    if (balancer.exitCode === null) {
      balancer.kill('SIGTERM');
      await balancer;
    }
    // Without workers the hot restart's successor is a process of its own.
    await execa('pkill', ['-TERM', '-f', runDir], { reject: false });
  });
  const routes = async (): Promise<StatusReport | undefined> => {
    try {
      const res = await fetch(`http://127.0.0.1:${adminPort}/v1/routes`, { signal: AbortSignal.timeout(2000) });
      return (await res.json()) as StatusReport;
    } catch {
      return undefined;
    }
  };
  await eventually(async () => (await routes())?.routes.some((r) => r.service === 'web' && r.listening), 30_000, 'the balancer serves web');
  if (workers) await eventually(() => childPids(balancer.pid!).length >= 2, 20_000, 'two workers run');

  const tally: Tally = { ok: 0, failedConnects: [], cutStreams: [], cutByKill: [], killing: false };
  let running = true;
  const loops = Array.from({ length: 6 }, () => clientLoop(webAddress, webPort, tally, () => running));
  let killed: number | undefined;
  let stopped: number | undefined;
  let hotRestarted = false;
  for (let i = 1; i <= reloads; i++) {
    await write(i % 2 === 0 ? [webSpec(i), extraSpec] : [webSpec(i)]);
    if (i === Math.floor(reloads / 4) && workers) {
      // A worker replaced gracefully: it stops accepting and drains, the primary starts another.
      stopped = childPids(balancer.pid!)[0];
      if (stopped) process.kill(stopped, 'SIGTERM');
    }
    if (i === Math.floor(reloads / 2) && workers) {
      killed = childPids(balancer.pid!)[0];
      tally.killing = true;
      if (killed) process.kill(killed, 'SIGKILL');
      // Each client loop has at most one stream open, and a stream lasts well under a second.
      setTimeout(() => (tally.killing = false), 1000);
    }
    if (i === Math.floor((2 * reloads) / 3)) {
      balancer.kill('SIGUSR2');
      hotRestarted = true;
    }
    await new Promise((r) => setTimeout(r, 30));
  }
  // The last config is served; then the clients stop.
  const last = webSpec(reloads);
  await eventually(async () => {
    const web = (await routes())?.routes.find((r) => r.service === 'web');
    return web && web.backends.map((b) => b.id).sort().join(',') === last.backends.map((b) => b.id).sort().join(',');
  }, 15_000, 'the last config is served');
  await new Promise((r) => setTimeout(r, 500));
  running = false;
  await Promise.all(loops);

  t.diagnostic(`${written} writes of balancer.json, ${tally.ok} connections echoed and closed cleanly; workers: ${workers ? `2 (SIGTERM to pid ${stopped}, SIGKILL to pid ${killed}, which cut ${tally.cutByKill.length} streams open in it)` : 'not supported by this build'}; hot restart: ${hotRestarted}`);
  assert.deepEqual(tally.failedConnects, [], 'no failed connects');
  assert.deepEqual(tally.cutStreams, [], 'no cut streams (but those open in the worker killed with SIGKILL)');
  assert.ok(tally.cutByKill.length <= 6, `the SIGKILL cut at most the streams open then (6 clients): ${tally.cutByKill.length}`);
  assert.ok(tally.ok >= 100, `enough traffic to mean something: ${tally.ok} connections`);
  if (workers) {
    assert.equal(balancer.exitCode, null, `the primary still runs: ${stderr.slice(-2000)}`);
    const now = childPids(balancer.pid!);
    assert.ok(killed !== undefined && !now.includes(killed), `the killed worker ${killed} was replaced: ${now.join(',')}`);
    assert.ok(stopped !== undefined && !now.includes(stopped), `the stopped worker ${stopped} was replaced: ${now.join(',')}`);
    assert.ok(now.length >= 2, `two workers run again: ${now.join(',')}`);
  } else {
    // The predecessor handed over and drained: it exits by itself, cleanly.
    await eventually(() => balancer.exitCode !== null, 40_000, 'the predecessor exits after draining');
    assert.equal(balancer.exitCode, 0, stderr.slice(-2000));
  }
});
