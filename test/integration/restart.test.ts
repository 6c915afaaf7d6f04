import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, openConnection, startIdServer, steadyLoad, whoAnswers, type IdServer } from '../support/net.js';
import { hostsPrelude, removeDir } from '../support/agent.js';
import type { StatusReport } from '../../agent/admin/report.js';
import { parseBalancerConfig, type ServiceSpec } from '../../agent/contract/balancer-config.js';
import { readFile } from 'node:fs/promises';

const main = join(import.meta.dirname, '..', '..', 'agent', 'cli', 'main.ts');

/** The real CLI as its own process (what systemd or the lab runs). Wrapped: an execa process is a thenable. */
function loopmesh(args: string[]): { process: ResultPromise } {
  return { process: execa('node', ['--import', 'tsx', main, ...args], { reject: false, stdio: ['ignore', 'ignore', 'pipe'], cleanup: true, env: { CONSUL_HTTP_ADDR: '' } }) };
}

async function stopProcess(p: ResultPromise | undefined): Promise<void> {
  if (!p || p.exitCode !== null) return;
  p.kill('SIGTERM');
  await p;
}

describe('restarts with real processes: a graceful stop drains, and --render-only restarts without touching traffic', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let a: IdServer;
  let b: IdServer;
  let dir: string;
  let servicePort: number;
  const procs: ResultPromise[] = [];

  before(async () => {
    consul = await TestConsul.start();
    a = await startIdServer('web-a');
    b = await startIdServer('web-b');
    servicePort = await freePort();
    for (const s of [a, b]) await consul.register({ id: s.id, name: 'web', port: s.port, meta: { 'loopmesh-port': String(servicePort) }, ttlCheck: { passing: true } });
    dir = await mkdtemp(join(tmpdir(), 'loopmesh-restart-'));
    await writeFile(join(dir, 'hosts'), hostsPrelude);
  });

  after(async () => {
    await Promise.all(procs.map(stopProcess));
    await Promise.all([a?.close(), b?.close()]);
    await consul?.close();
    if (dir) await removeDir(dir);
  });

  async function servedWeb(runDir: string): Promise<ServiceSpec | undefined> {
    const text = await readFile(join(runDir, 'balancer.json'), 'utf8').catch(() => '');
    if (!text) return undefined;
    const web = parseBalancerConfig(text).services.find((s) => s.service === 'web');
    return web && web.backends.length === 2 ? web : undefined;
  }

  test('SIGTERM to the agent: listeners close at once, an open connection keeps working until it ends, then the process exits', async () => {
    const runDir = join(dir, 'single');
    const admin = `127.0.0.1:${await freePort()}`;
    const agent = loopmesh(['agent', '--consul', consul.url, '--run-dir', runDir, '--hosts-file', join(dir, 'hosts'), '--dns', 'off', '--admin', admin, '--range', '127.80.0.0/16', '--drain-timeout', '20']).process;
    procs.push(agent);
    const web = await eventually(() => servedWeb(runDir), 20_000, 'web rendered');
    await eventually(() => whoAnswers(web.address, web.port, 1000), 10_000, 'web.local accepting');
    const open = await openConnection(web.address, web.port);
    agent.kill('SIGTERM');
    await eventually(() => whoAnswers(web.address, web.port, 500).then(() => false, (err: Error) => /ECONNREFUSED/.test(err.message)), 5000, 'new connections refused');
    assert.equal(agent.exitCode, null, 'still running while a connection is open');
    assert.equal(await open.ping('still here'), 'still here', 'the open connection still carries data');
    const started = Date.now();
    open.socket.end();
    await agent;
    assert.equal(agent.exitCode, 0);
    assert.ok(Date.now() - started < 5000, 'exits soon after the last connection ends, not at the drain deadline');
  });

  test('--render-only agent + loopmesh balancer: restarting the agent under load fails no connection and cuts none', async (t) => {
    const runDir = join(dir, 'split');
    const admin = `127.0.0.1:${await freePort()}`;
    const agentArgs = ['agent', '--render-only', '--consul', consul.url, '--run-dir', runDir, '--admin', admin, '--range', '127.81.0.0/16', '--kv-prefix', 'loopmesh-split'];
    const balancer = loopmesh(['balancer', '--run-dir', runDir, '--hosts-file', join(dir, 'hosts'), '--dns', 'off']).process;
    procs.push(balancer);
    let agent = loopmesh(agentArgs).process;
    procs.push(agent);
    const web = await eventually(() => servedWeb(runDir), 20_000, 'web rendered');
    await eventually(() => whoAnswers(web.address, web.port, 1000), 15_000, 'the balancer process serving web');
    const report = (await (await fetch(`http://${admin}/v1/routes`)).json()) as StatusReport;
    assert.equal(report.dataPlane, 'separate');
    assert.equal(report.routes.find((r) => r.service === 'web')?.listening, null, 'the agent does not claim to listen');

    const open = await openConnection(web.address, web.port);
    const load = steadyLoad(web.address, web.port);
    await new Promise((r) => setTimeout(r, 300));
    agent.kill('SIGTERM');
    await agent;
    agent = loopmesh(agentArgs).process;
    procs.push(agent);
    await eventually(() => fetch(`http://${admin}/health`).then((r) => r.ok), 15_000, 'the new agent up');
    // The restarted agent still drives the balancer: a new service appears.
    const extra = await startIdServer('extra');
    t.after(() => extra.close());
    await consul.register({ id: 'extra', name: 'extra', port: extra.port, ttlCheck: { passing: true } });
    const extraRoute = await eventually(async () => {
      const text = await readFile(join(runDir, 'balancer.json'), 'utf8');
      return parseBalancerConfig(text).services.find((s) => s.service === 'extra');
    }, 10_000, 'extra rendered by the new agent');
    assert.equal(await eventually(() => whoAnswers(extraRoute.address, extraRoute.port, 1000), 10_000, 'extra served by the balancer process'), 'extra');
    const result = await load.stop();
    t.diagnostic(`agent restart under load: ${result.ok} connections, ${result.failed.length} failed`);
    assert.deepEqual(result.failed, [], 'no new connection failed while the agent restarted');
    assert.ok(result.ok > 20, `load ran (${result.ok} connections)`);
    assert.equal(await open.ping('after restart'), 'after restart', 'the connection opened before the restart still works');
    assert.equal((await servedWeb(runDir))?.address, web.address, 'the same address after the restart');
    open.socket.destroy();
    await consul.deregister('extra');
  });
});
