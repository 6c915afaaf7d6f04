import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { canUnshare, dig, withHostsFile } from '../support/resolve.js';
import { hostsPrelude, removeDir, startAgent } from '../support/agent.js';
import type { Agent } from '../../agent/agent.js';

/** Connects `n` times to the route and returns who answered (or the error text). */
async function sample(address: string, port: number, n: number): Promise<string[]> {
  const out: string[] = [];
  for (let i = 0; i < n; i += 1) out.push(await whoAnswers(address, port).catch((err: Error) => `error: ${err.message}`));
  return out;
}

function route(agent: Agent, service: string) {
  return agent.dataPlane!.config()?.services.find((s) => s.service === service);
}

/** After `change`, how long until new connections stop reaching `gone`; then 20 more must all avoid it. */
async function convergence(address: string, port: number, gone: string, change: () => Promise<void>): Promise<{ ms: number; after: string[] }> {
  const start = Date.now();
  await change();
  let lastSeen = start;
  while (Date.now() - start < 1500) {
    if ((await whoAnswers(address, port).catch(() => '')) === gone) lastSeen = Date.now();
  }
  return { ms: lastSeen - start, after: await sample(address, port, 20) };
}

describe('loopmesh agent with a real Consul', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let a: IdServer;
  let b: IdServer;
  let servicePort: number;
  let node: Awaited<ReturnType<typeof startAgent>>;
  const dirs: string[] = [];

  before(async () => {
    consul = await TestConsul.start();
    a = await startIdServer('web-a');
    b = await startIdServer('web-b');
    servicePort = await freePort();
    for (const s of [a, b]) {
      await consul.register({ id: s.id, name: 'web', port: s.port, meta: { 'loopmesh-port': String(servicePort) }, ttlCheck: { passing: true } });
    }
    node = await startAgent(consul.url);
    dirs.push(node.dir);
    await eventually(() => route(node.agent, 'web')?.backends.length === 2, 10_000, 'web with two backends');
  });

  after(async () => {
    await node?.stop().catch(() => undefined);
    await Promise.all([a?.close(), b?.close()]);
    await consul?.close();
    await Promise.all(dirs.map(removeDir));
  });

  test('the DNS responder answers web.local with its address, and SRV with its port', async () => {
    const web = route(node.agent, 'web');
    assert.ok(web);
    assert.match(web.address, /^127\.78\.\d+\.\d+$/);
    const dns = node.config.dns!;
    assert.deepEqual((await dig(dns, 'web.local', 'A')).answers, [web.address]);
    const srv = await dig(dns, 'web.local', 'SRV');
    assert.match(srv.answers[0] ?? '', new RegExp(`^\\d+ \\d+ ${servicePort} web\\.local\\.$`));
    assert.equal((await dig(dns, 'nope.local')).status, 'NXDOMAIN');
    assert.equal((await dig(dns, 'example.com')).status, 'REFUSED');
  });

  test('the hosts file gets the block, the rest stays byte for byte, and a real lookup resolves it', async (t) => {
    const web = route(node.agent, 'web')!;
    const block = new RegExp(`# BEGIN loopmesh[^\\n]*\\n${web.address.replace(/\./g, '\\.')} web\\.local\\n# END loopmesh`);
    // The hosts block follows the route it is derived from (a busy machine may take a moment).
    const text = await eventually(async () => {
      const now = await readFile(node.config.hostsFile!, 'utf8');
      return block.test(now) ? now : undefined;
    }, 5000, 'the hosts block');
    assert.ok(text.startsWith(hostsPrelude), 'everything before the block is untouched');
    if (!(await canUnshare())) return t.skip('cannot make a mount namespace here (needs root): getent check skipped');
    const lookup = await withHostsFile(node.config.hostsFile!, 'getent hosts web.local');
    assert.equal(lookup.stdout.split(/\s+/)[0], web.address);
    const viaCurl = await withHostsFile(node.config.hostsFile!, `curl -s --max-time 3 telnet://web.local:${servicePort} </dev/null | head -1`);
    assert.match(viaCurl.stdout, /^web-[ab]$/, 'curl connects by name through the balancer');
  });

  test("the status report names the node as the local Consul agent does (not the hostname, which network namespaces share)", async () => {
    await eventually(() => node.agent.statusReport().node === `loopmesh-test-${consul.httpPort}`, 5000, `node name loopmesh-test-${consul.httpPort} in the report`);
  });

  test('connections reach both instances', async () => {
    const web = route(node.agent, 'web')!;
    const seen = await sample(web.address, web.port, 10);
    assert.deepEqual(new Set(seen), new Set(['web-a', 'web-b']), seen.join(','));
  });

  test('a deregistered instance gets no new connections within 1 s', async (t) => {
    const web = route(node.agent, 'web')!;
    const result = await convergence(web.address, web.port, 'web-b', () => consul.deregister('web-b'));
    t.diagnostic(`deregistration: last connection to web-b ${result.ms} ms after the deregister call returned`);
    assert.ok(result.ms < 1000, `web-b still got connections ${result.ms} ms after deregistration`);
    assert.deepEqual(new Set(result.after), new Set(['web-a']));
    await consul.register({ id: 'web-b', name: 'web', port: b.port, meta: { 'loopmesh-port': String(servicePort) }, ttlCheck: { passing: true } });
    await eventually(() => route(node.agent, 'web')?.backends.length === 2, 5000, 'web-b back');
  });

  test('an instance whose check fails gets no new connections within 1 s', async (t) => {
    const web = route(node.agent, 'web')!;
    const result = await convergence(web.address, web.port, 'web-b', () => consul.setCheck('web-b', 'fail'));
    t.diagnostic(`failing check: last connection to web-b ${result.ms} ms after the check turned critical`);
    assert.ok(result.ms < 1000, `web-b still got connections ${result.ms} ms after its check failed`);
    assert.deepEqual(new Set(result.after), new Set(['web-a']));
    await consul.setCheck('web-b', 'pass');
    await eventually(() => route(node.agent, 'web')?.backends.length === 2, 5000, 'web-b passing again');
  });

  test('node maintenance on, then off (a node-level check): the instances leave, then come back', async () => {
    // Node-level checks (maintenance, serfHealth when a node is cut off) name no service; turning one
    // off must bring back instances that loopmesh no longer holds as healthy.
    await consul.api('PUT', '/v1/agent/maintenance?enable=true&reason=loopmesh-test');
    await eventually(() => route(node.agent, 'web')?.backends.length === 0, 5000, 'web with no backends during node maintenance');
    await consul.api('PUT', '/v1/agent/maintenance?enable=false');
    await eventually(() => route(node.agent, 'web')?.backends.length === 2, 5000, 'both web instances back after node maintenance');
  });

  test('a killed backend process: the connect is retried on the other instance', async () => {
    const web = route(node.agent, 'web')!;
    await b.close();
    const seen = await sample(web.address, web.port, 10);
    assert.deepEqual(new Set(seen), new Set(['web-a']), `every connect must still succeed: ${seen.join(',')}`);
    const status = node.agent.dataPlane!.balancer.snapshot().find((s) => s.service === 'web')!;
    assert.ok(status.retries >= 1, `expected retries, got ${status.retries}`);
    assert.equal(status.failedConnections, 0);
    b = await startIdServer('web-b', '127.0.0.1', b.port);
  });

  test('the agent restarted, and a second node with an empty run dir: the same addresses', async () => {
    const before = node.agent.dataPlane!.config()!.services.map((s) => `${s.service}=${s.address}:${s.port}`);
    await consul.register({ id: 'redis-1', name: 'redis', port: 6379, ttlCheck: { passing: true } });
    await eventually(() => route(node.agent, 'redis'), 5000, 'redis route');
    const expected = node.agent.dataPlane!.config()!.services.map((s) => `${s.service}=${s.address}:${s.port}`).sort();
    assert.ok(expected.length === before.length + 1);
    await node.stop();
    node = await startAgent(consul.url, {}, node.dir);
    await eventually(() => node.agent.dataPlane!.config()?.services.length === 2, 5000, 'routes after restart');
    assert.deepEqual(node.agent.dataPlane!.config()!.services.map((s) => `${s.service}=${s.address}:${s.port}`).sort(), expected);
    const other = await startAgent(consul.url, { range: '127.78.0.0/16' });
    dirs.push(other.dir);
    try {
      await eventually(() => other.agent.dataPlane!.config()?.services.length === 2, 5000, 'routes on the second node');
      assert.deepEqual(other.agent.dataPlane!.config()!.services.map((s) => `${s.service}=${s.address}:${s.port}`).sort(), expected);
    } finally {
      await other.stop();
    }
    await consul.deregister('redis-1');
  });

  test('Consul stopped: routes keep serving, health says degraded, and a restarted agent serves from its files', async () => {
    const web = route(node.agent, 'web')!;
    await eventually(() => route(node.agent, 'web')?.backends.length === 2, 5000, 'web-b back');
    await consul.stop();
    await eventually(() => !node.agent.watcher.status().connected, 5000, 'the agent to notice');
    assert.deepEqual(new Set(await sample(web.address, web.port, 10)), new Set(['web-a', 'web-b']));
    const health = (await (await fetch(`http://127.0.0.1:${node.config.admin!.port}/health`)).json()) as { status: string };
    assert.equal(health.status, 'degraded');
    await node.stop();
    node = await startAgent(consul.url, {}, node.dir);
    await eventually(() => route(node.agent, 'web'), 3000, 'routes loaded from the run dir');
    assert.equal(route(node.agent, 'web')?.address, web.address);
    assert.deepEqual(new Set(await sample(web.address, web.port, 10)), new Set(['web-a', 'web-b']));
  });
});
