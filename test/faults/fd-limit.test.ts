import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa, type ResultPromise } from 'execa';
import { parseBalancerConfig, type ServiceSpec } from '../../agent/contract/balancer-config.js';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { hostsPrelude, removeDir, startAgent } from '../support/agent.js';
import { dig } from '../support/resolve.js';

/** File descriptors exhausted (issue 7, the fault suite): a real `loopmesh agent` process under `prlimit --nofile`. */

const main = join(import.meta.dirname, '..', '..', 'agent', 'cli', 'main.ts');
/** Low enough to exhaust with a few dozen connections, high enough that the agent starts (it holds about 35 idle). */
const limit = 128;

/** A client connection held open: what became of it, and a way to check it still carries data. */
interface Held {
  socket: Socket;
  outcome: Promise<string>;
  ping(text: string): Promise<string>;
}

function hold(host: string, port: number, settleMs: number): Held {
  const socket = connect({ host, port });
  let buffer = '';
  const lines: string[] = [];
  let wake: (() => void) | undefined;
  socket.on('data', (chunk) => {
    buffer += chunk.toString();
    for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
      lines.push(buffer.slice(0, nl));
      buffer = buffer.slice(nl + 1);
    }
    wake?.();
  });
  const outcome = new Promise<string>((resolve) => {
    socket.once('data', () => resolve('greeted'));
    socket.once('error', (err: NodeJS.ErrnoException) => resolve(`error ${err.code ?? err.message}`));
    socket.once('close', () => resolve('closed before a greeting'));
    setTimeout(() => resolve('waiting'), settleMs).unref();
  });
  const nextLine = async (): Promise<string> => {
    const deadline = Date.now() + 3000;
    while (lines.length === 0 && Date.now() < deadline) await new Promise<void>((r) => ((wake = r), setTimeout(r, 100).unref()));
    const line = lines.shift();
    if (line === undefined) throw new Error('no line within 3 s');
    return line;
  };
  return {
    socket,
    outcome,
    ping: async (text) => {
      lines.length = 0;
      socket.write(`${text}\n`);
      return nextLine();
    },
  };
}

async function cpuMs(pid: number, ticksPerSecond: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
  // utime and stime, fields 14 and 15 of /proc/PID/stat (11 and 12 after the command name).
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / ticksPerSecond;
}

async function health(admin: string): Promise<{ code: number; text: string }> {
  const res = await fetch(`http://${admin}/health`, { signal: AbortSignal.timeout(2000) });
  return { code: res.status, text: await res.text() };
}

function count(values: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const v of values) out[v] = (out[v] ?? 0) + 1;
  return out;
}

describe('faults: file descriptors exhausted', { timeout: 100_000 }, () => {
  let consul: TestConsul;
  let backend: IdServer;
  let late: IdServer;
  let port: number;
  let dir: string;
  let agent: ResultPromise | undefined;

  before(async () => {
    consul = await TestConsul.start();
    backend = await startIdServer('backend');
    late = await startIdServer('late');
    port = await freePort();
    await consul.register({ id: 'web-1', name: 'web', port: backend.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
    dir = await mkdtemp(join(tmpdir(), 'loopmesh-fd-'));
    await writeFile(join(dir, 'hosts'), hostsPrelude);
  });

  after(async () => {
    if (agent && agent.exitCode === null) {
      agent.kill('SIGTERM');
      await agent;
    }
    await Promise.all([backend?.close(), late?.close()]);
    await consul?.close();
    if (dir) await removeDir(dir);
  });

  test(`--nofile ${limit}: connections beyond the limit are closed at once, nothing crashes or spins, and everything recovers`, async (t) => {
    const runDir = join(dir, 'run');
    const admin = `127.0.0.1:${await freePort()}`;
    const dns = { host: '127.0.0.1', port: await freePort() };
    const ticks = Number((await execa('getconf', ['CLK_TCK'])).stdout) || 100;
    agent = execa('prlimit', [`--nofile=${limit}:${limit}`, 'node', '--import', 'tsx', main, 'agent', '--consul', consul.url, '--run-dir', runDir, '--hosts-file', join(dir, 'hosts'), '--dns', `${dns.host}:${dns.port}`, '--admin', admin, '--range', '127.78.0.0/16'], {
      reject: false,
      cleanup: true,
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { LOOPMESH_LOG_FORMAT: 'json', CONSUL_HTTP_ADDR: '' },
    });
    const pid = agent.pid!;
    const child = agent;
    // On a failure too: its listeners would stay on the addresses the next test's agent needs.
    t.after(async () => {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM');
      await child;
    });
    const route = async (service: string): Promise<ServiceSpec | undefined> => {
      const text = await readFile(join(runDir, 'balancer.json'), 'utf8').catch(() => '');
      return text ? parseBalancerConfig(text).services.find((s) => s.service === service) : undefined;
    };
    const web = await eventually(() => route('web'), 30_000, 'web rendered');
    await eventually(async () => (await health(admin)).code === 200, 20_000, 'health 200 before');
    assert.equal(await whoAnswers(web.address, web.port), 'backend');
    const limits = await readFile(`/proc/${pid}/limits`, 'utf8');
    assert.match(limits, new RegExp(`Max open files\\s+${limit}\\s+${limit}`), 'the agent runs under the limit');
    const idle = (await readdir(`/proc/${pid}/fd`)).length;
    assert.ok(idle < limit / 2, `the agent holds ${idle} descriptors idle, well under ${limit}`);

    // Twice the limit: each forwarded connection costs the agent two descriptors.
    const held = Array.from({ length: 2 * limit }, () => hold(web.address, web.port, 5000));
    try {
      const outcomes = await Promise.all(held.map((h) => h.outcome));
      const cpuAt = await cpuMs(pid, ticks);
      const wallAt = Date.now();
      const fdsExhausted = (await readdir(`/proc/${pid}/fd`)).length;
      const byOutcome = count(outcomes);
      const greeted = byOutcome.greeted ?? 0;
      assert.ok(fdsExhausted >= limit - 2, `descriptors exhausted (${fdsExhausted} open of ${limit})`);
      assert.ok(greeted > 0 && greeted <= (limit - idle) / 2 + 2, `about (limit - idle) / 2 connections forwarded: ${JSON.stringify(byOutcome)}`);
      const ended = (byOutcome['closed before a greeting'] ?? 0) + (byOutcome['error ECONNRESET'] ?? 0);
      assert.equal(ended + greeted, held.length, `the rest accepted and closed at once (libuv's EMFILE reserve descriptor), none left waiting: ${JSON.stringify(byOutcome)}`);

      // Meanwhile: Consul changes, and DNS over UDP (its socket is already open).
      await consul.register({ id: 'late-1', name: 'late', port: late.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
      const during = await dig(dns, 'web.local');
      assert.deepEqual(during.answers, [web.address], `DNS answers while descriptors are exhausted: ${during.status}`);
      const healthDuring = await health(admin).then((h) => `${h.code} ${h.text.slice(0, 200)}`, (err: Error & { cause?: { code?: string } }) => `no answer (${err.cause?.code ?? err.message})`);
      await sleep(3000);
      const forwarded = held.filter((_, i) => outcomes[i] === 'greeted');
      for (const h of forwarded.slice(0, 5)) assert.equal(await h.ping('still here'), 'still here', 'a forwarded connection still carries data');
      const cpu = (await cpuMs(pid, ticks)) - cpuAt;
      const wall = Date.now() - wallAt;
      assert.equal(agent.exitCode, null, 'the agent is still running');
      assert.ok(cpu < 0.3 * wall, `no spin at the limit: ${cpu} ms CPU over ${wall} ms`);
      t.diagnostic(`limit ${limit}, ${idle} descriptors idle; ${held.length} connections: ${JSON.stringify(byOutcome)}; ${fdsExhausted} descriptors open at the limit; agent CPU ${cpu} ms over ${wall} ms; /health meanwhile: ${healthDuring}`);
    } finally {
      for (const h of held) h.socket.destroy();
    }

    const releasedAt = Date.now();
    // The agent sees each close as the FIN arrives: its descriptors come back within moments, not at once.
    await eventually(async () => (await readdir(`/proc/${pid}/fd`)).length <= idle + 4, 10_000, 'descriptors back to idle');
    await eventually(async () => (await health(admin)).code === 200, 20_000, 'health 200 once the connections are closed');
    assert.equal(await whoAnswers(web.address, web.port), 'backend', 'a new connection through web');
    const lateRoute = await eventually(() => route('late'), 20_000, 'the service registered at the limit rendered');
    assert.equal(await eventually(() => whoAnswers(lateRoute.address, lateRoute.port, 1000), 20_000, 'late served'), 'late', 'the service registered at the limit is served');
    const recoveredMs = Date.now() - releasedAt;
    assert.deepEqual((await dig(dns, 'web.local')).answers, [web.address]);
    assert.deepEqual((await dig(dns, 'late.local')).answers, [lateRoute.address]);
    const lateLine = new RegExp(`^${lateRoute.address.replace(/\./g, '\\.')}\\s+late\\.local`, 'm');
    // A hosts write that failed at the limit is retried with backoff (up to 10 s apart), not only on the next change.
    await eventually(async () => lateLine.test(await readFile(join(dir, 'hosts'), 'utf8')), 15_000, 'the hosts block has the late service');
    const fdsAfter = (await readdir(`/proc/${pid}/fd`)).length;

    agent.kill('SIGTERM');
    const result = await agent;
    assert.equal(result.exitCode, 0, 'a clean exit on SIGTERM');
    const lines = String(result.stderr).split('\n').filter(Boolean).map((l) => JSON.parse(l) as { level: number; msg: string; code?: string; err?: string });
    const emfile = lines.filter((l) => /EMFILE/.test(`${l.msg} ${l.err ?? ''}`)).map((l) => `${l.code ?? ''} ${l.msg.replace(/\/tmp\/\S+/g, 'FILE').slice(0, 60)}`);
    assert.ok(!lines.some((l) => l.level >= 60), 'nothing fatal logged');
    t.diagnostic(`recovered ${(recoveredMs / 1000).toFixed(1)} s after the release: health 200, web and late served, DNS and hosts updated; ${fdsAfter} descriptors; EMFILE in the log: ${JSON.stringify(count(emfile))}`);
  });

  test('a rendered file that could not be written (as at EMFILE) is written again without any catalog change', async () => {
    const base = await mkdtemp(join(tmpdir(), 'loopmesh-fd-'));
    await writeFile(join(base, 'hosts'), hostsPrelude);
    // haproxy.cfg is a folder: its write fails, as every open did while descriptors were exhausted.
    await mkdir(join(base, 'run', 'haproxy.cfg'), { recursive: true });
    const node = await startAgent(consul.url, {}, base);
    try {
      const url = `http://127.0.0.1:${node.config.admin!.port}/health`;
      await eventually(async () => (await (await fetch(url)).text()).includes('LM_ERR_RENDER_WRITE'), 10_000, 'the failed write reported');
      // Past the start-up reconciles (the first KV write triggers one), so only a retry can write the file.
      await sleep(3000);
      await rm(join(base, 'run', 'haproxy.cfg'), { recursive: true });
      let last = '';
      await eventually(async () => {
        const res = await fetch(url);
        last = await res.text();
        return res.status === 200;
      }, 15_000, 'health 200 once the write can succeed').catch((err: Error) => assert.fail(`${err.message}; last /health: ${last}`));
      assert.ok((await stat(join(base, 'run', 'haproxy.cfg'))).isFile(), 'haproxy.cfg written');
    } finally {
      await node.stop();
      await removeDir(base);
    }
  });
});
