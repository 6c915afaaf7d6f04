import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { removeDir, startAgent } from '../support/agent.js';

/**
 * A backend whose host drops SYNs while its Consul check still passes (issue 8, "What was seen"):
 * a real black hole, made by an iptables DROP rule on a loopback port, so that connect() hangs.
 */

const requests = 40;
const connectTimeoutMs = 1000;

function iptables(action: '-I' | '-D', port: number): void {
  execFileSync('iptables', [action, 'INPUT', '-p', 'tcp', '-d', '127.0.0.1', '--dport', String(port), '--syn', '-j', 'DROP'], { stdio: 'pipe' });
}

describe('faults: a black-holed backend whose check still passes', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let good: IdServer;
  let holePort: number;
  let ruleAdded = false;

  before(async () => {
    holePort = await freePort();
    iptables('-I', holePort);
    ruleAdded = true;
    consul = await TestConsul.start();
    good = await startIdServer('good');
  });

  after(async () => {
    if (ruleAdded) iptables('-D', holePort);
    await good?.close();
    await consul?.close();
  });

  for (const policy of ['p2c-ewma', 'round-robin', 'least-conn'] as const) {
    test(`${policy}: at most a few of ${requests} sequential requests pay the connect timeout; the hole is avoided and shown`, async (t) => {
      // The rule really makes connects hang: without it this test would prove nothing.
      await assert.rejects(whoAnswers('127.0.0.1', holePort, 500), /no greeting .* within 500 ms/);

      const name = `holed-${policy}`;
      const meta = { 'loopmesh-port': String(await freePort()), 'loopmesh-lb': policy };
      await consul.register({ id: `hole-${policy}`, name, port: holePort, meta, ttlCheck: { passing: true } });
      await consul.register({ id: `good-${policy}`, name, port: good.port, meta, ttlCheck: { passing: true } });
      const node = await startAgent(consul.url, { connectTimeout: String(connectTimeoutMs / 1000), services: name });
      try {
        const route = await eventually(
          () => node.agent.dataPlane!.config()?.services.find((s) => s.service === name && s.backends.length === 2),
          10_000,
          'both instances routed',
        );
        assert.equal(route.policy, policy, 'the policy from meta loopmesh-lb');
        const durations: number[] = [];
        for (let i = 0; i < requests; i++) {
          const started = Date.now();
          assert.equal(await whoAnswers(route.address, route.port, 5000), 'good');
          durations.push(Date.now() - started);
        }
        const slow = durations.filter((ms) => ms >= connectTimeoutMs).length;
        const backends = node.agent.dataPlane!.balancer.snapshot().find((s) => s.service === name)?.backends ?? [];
        const hole = backends.find((b) => b.port === holePort);
        t.diagnostic(`${policy}: ${slow} of ${requests} requests took >= the ${connectTimeoutMs} ms connect timeout (measured before the fix with this same test: 39 of 40)`);
        t.diagnostic(`hole backend status: ${JSON.stringify(hole)}`);
        assert.ok(slow <= 4, `at most 4 of ${requests} requests wait for the connect timeout, saw ${slow}: ${durations.join(', ')}`);
        assert.ok(hole, 'the black-holed backend is in the status');
        assert.equal(hole.failedConnects, slow, 'every slow request is one failed connect to the hole, retried on the good one');
        if (policy === 'p2c-ewma') {
          // One timeout makes its connect-time EWMA about the timeout: p2c stops choosing it at once.
          assert.ok((hole.ewmaConnectMs ?? 0) >= connectTimeoutMs / 2, `the EWMA shows the timeout: ${hole.ewmaConnectMs}`);
        } else {
          assert.ok(hole.consecutiveFailures >= 3, `consecutive failures counted: ${hole.consecutiveFailures}`);
          assert.ok(hole.ejectedUntil && Date.parse(hole.ejectedUntil) > Date.now(), `ejected, shown in status: ${hole.ejectedUntil}`);
          assert.equal(hole.ejectReason, 'timeout');
        }
      } finally {
        await node.stop();
        await removeDir(node.dir);
      }
    });
  }
});
