import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Balancer } from '../../agent/balancer/balancer.js';
import type { ServiceSpec } from '../../agent/contract/balancer-config.js';
import { TestConsul } from '../support/consul.js';
import { captureLogger } from '../support/log.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { removeDir, startAgent } from '../support/agent.js';

/** A backend that is one of loopmesh's own listeners (issue 7, finding 3): refused, never a loop. */

async function openFds(): Promise<number> {
  return (await readdir('/proc/self/fd')).length;
}

describe('faults: a backend that is loopmesh itself', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let good: IdServer;
  let other: IdServer;

  before(async () => {
    consul = await TestConsul.start();
    good = await startIdServer('good');
    other = await startIdServer('other');
  });

  after(async () => {
    await Promise.all([good?.close(), other?.close()]);
    await consul?.close();
  });

  test('from Consul: an instance registered at the service\'s own loopmesh address is refused and reported; the good one serves', async () => {
    const port = await freePort();
    const log = captureLogger('info');
    await consul.register({ id: 'loop-good', name: 'loop', port: good.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
    const node = await startAgent(consul.url, {}, undefined, log.logger);
    try {
      const route = await eventually(() => node.agent.dataPlane!.config()?.services.find((s) => s.service === 'loop'), 10_000, 'loop routed');
      // Consul accepts any address: point a second instance at loopmesh's own listener.
      await consul.register({ id: 'loop-self', name: 'loop', address: route.address, port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
      await eventually(() => log.lines.some((l) => l.code === 'LM_ERR_PLAN_SELF_BACKEND'), 10_000, 'the refusal logged');
      const rendered = await readFile(join(node.agent.config.runDir, 'balancer.json'), 'utf8');
      assert.doesNotMatch(rendered, /loop-self/, 'never rendered as a backend');
      for (let i = 0; i < 10; i += 1) assert.equal(await whoAnswers(route.address, port), 'good');
      const problems = node.agent.problems();
      assert.ok(problems.some((p) => p.code === 'LM_ERR_PLAN_SELF_BACKEND' && p.service === 'loop' && p.message.includes(route.address)), JSON.stringify(problems));
    } finally {
      await node.stop();
      await removeDir(node.dir);
    }
  });

  test('at run time: two services that are each other\'s backend are refused on connect, fds stay bounded, other services unaffected', async () => {
    const log = captureLogger('debug');
    const balancer = new Balancer({ logger: log.logger, connectTimeoutMs: 1000, drainTimeoutMs: 500 });
    const [pingPort, pongPort, otherPort] = [await freePort(), await freePort(), await freePort()];
    // A file written by hand (or a host name that resolves back here): each dials the other's listener.
    const spec = (name: string, port: number, backendPort: number): ServiceSpec => ({
      service: name, name, fqdn: `${name}.local`, address: '127.0.0.1', port, policy: 'round-robin', empty: 'reject',
      backends: [{ id: `n/${name}-backend`, address: '127.0.0.1', port: backendPort }],
    });
    const fine: ServiceSpec = {
      service: 'fine', name: 'fine', fqdn: 'fine.local', address: '127.0.0.1', port: otherPort, policy: 'round-robin', empty: 'reject',
      backends: [{ id: 'n/other', address: '127.0.0.1', port: other.port }],
    };
    const loopPort = pingPort;
    const result = await balancer.apply({ version: 1, services: [spec('ping', pingPort, pongPort), spec('pong', pongPort, pingPort), fine] });
    assert.deepEqual(result.failed, []);
    try {
      const fdsBefore = await openFds();
      const outcomes = await Promise.all(Array.from({ length: 20 }, () => whoAnswers('127.0.0.1', loopPort, 3000).then((who) => who, (err: Error) => `closed: ${err.message}`)));
      assert.ok(outcomes.every((o) => o.startsWith('closed')), `every connection to the looping service is closed: ${outcomes.join(', ')}`);
      // Meanwhile and after, the other service answers.
      assert.equal(await whoAnswers('127.0.0.1', otherPort), 'other');
      await eventually(async () => (await openFds()) <= fdsBefore + 4, 5000, 'file descriptors back to where they were');
      assert.ok(log.lines.some((l) => l.code === 'LM_ERR_BALANCER_SELF_BACKEND'), 'refusal logged with its code');
      const status = new Map(balancer.snapshot().map((s) => [s.service, s.totalConnections]));
      assert.equal(status.get('ping'), 20, 'ping accepted the 20 clients and nothing of its own');
      assert.equal(status.get('pong'), 0, 'ping never dialed pong');
    } finally {
      await balancer.close();
    }
  });
});
