import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { TestConsul } from '../support/consul.js';
import { eventually } from '../support/net.js';
import { removeDir, startAgent } from '../support/agent.js';

// The explicit-list modes with a real Consul and the real agent: --services (one long poll per named
// service, up to --max-watches) and --services-kv (the list itself in KV, followed live).

type Started = Awaited<ReturnType<typeof startAgent>>;

/** A KV value as raw bytes (TestConsul.api sends JSON). */
async function kvPut(consul: TestConsul, key: string, value: string): Promise<void> {
  const res = await fetch(`${consul.url}/v1/kv/${key}`, { method: 'PUT', body: value });
  assert.equal(res.status, 200, `PUT ${key}`);
}

const routed = (node: Started): string[] => node.agent.routes().map((r) => r.service).sort();
const backendsOf = (node: Started, service: string): string[] =>
  node.agent.routes().find((r) => r.service === service)?.backends.map((b) => `${b.address}:${b.port}`) ?? [];

describe('watch modes: a named list of services', { timeout: 180_000 }, () => {
  let consul: TestConsul;
  const nodes: Started[] = [];

  before(async () => {
    consul = await TestConsul.start();
    await consul.register({ id: 'web-1', name: 'web', port: 8001, address: '10.1.0.1', ttlCheck: { passing: true } });
    await consul.register({ id: 'api-1', name: 'api', port: 8002, address: '10.1.0.2', ttlCheck: { passing: true } });
    for (let i = 0; i < 5; i++) await consul.register({ id: `other${i}-1`, name: `other${i}`, port: 8100 + i, ttlCheck: { passing: true } });
  });

  after(async () => {
    for (const n of nodes) {
      await n.stop();
      await removeDir(n.dir);
    }
    await consul?.close();
  });

  test('--services: one poll per named service; an address change arrives with one read of that service; other services cost nothing; a named service registered later appears', async () => {
    const node = await startAgent(consul.url, { services: 'web,api,late' });
    nodes.push(node);
    assert.equal(node.agent.watcher.mode(), 'per-service');
    await eventually(() => routed(node).join() === 'api,web', 15_000, 'web and api routed, nothing else');
    assert.equal(node.agent.statusReport().consul?.watchMode, 'per-service', 'the admin API says how the node watches');
    await new Promise((r) => setTimeout(r, 300));

    // A re-registration with a new address and the same check: the catalog-wide watch needs a probe or sweep for it.
    const before = node.agent.watcher.status().serviceReads ?? 0;
    await consul.register({ id: 'web-1', name: 'web', port: 8001, address: '10.1.0.9', ttlCheck: { passing: true } });
    await eventually(() => backendsOf(node, 'web').join() === '10.1.0.9:8001', 10_000, 'web at its new address');
    await new Promise((r) => setTimeout(r, 300));
    const reads = (node.agent.watcher.status().serviceReads ?? 0) - before;
    process.stdout.write(`# watch modes: --services address change: ${reads} service answers\n`);
    // The re-registration may touch the service's check as well as its entry: at most two answers, of web.
    assert.ok(reads >= 1 && reads <= 2, `${reads} answers for one address change`);

    const quiet = node.agent.watcher.status().serviceReads ?? 0;
    await consul.register({ id: 'other0-2', name: 'other0', port: 8200, ttlCheck: { passing: true } });
    await consul.setCheck('other1-1', 'fail');
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal((node.agent.watcher.status().serviceReads ?? 0) - quiet, 0, 'changes to services not named cost no read');

    await consul.register({ id: 'late-1', name: 'late', port: 8003, ttlCheck: { passing: true } });
    await eventually(() => routed(node).join() === 'api,late,web', 10_000, 'late routed once registered');
    await consul.deregister('late-1');
    await eventually(() => routed(node).join() === 'api,web', 10_000, 'late gone once deregistered');
  });

  test('--max-watches below the list: the catalog-wide watch, same routes', async () => {
    const node = await startAgent(consul.url, { services: 'web,api', maxWatches: '1' });
    nodes.push(node);
    assert.equal(node.agent.watcher.mode(), 'catalog');
    await eventually(() => routed(node).join() === 'api,web', 15_000, 'web and api routed');
  });

  test('--services-kv: the list in KV is followed live; a bad entry is skipped by name; a broken value keeps the last good list; a missing key routes nothing and says so', async () => {
    const key = 'loopmesh/services/node-a';
    await kvPut(consul, key, '["web"]');
    const node = await startAgent(consul.url, { servicesKv: key });
    nodes.push(node);
    await eventually(() => routed(node).join() === 'web', 15_000, 'web routed from the KV list');
    assert.equal(node.agent.watcher.mode(), 'per-service');

    await kvPut(consul, key, 'web\napi\n# a comment\nno spaces allowed');
    await eventually(() => routed(node).join() === 'api,web', 10_000, 'api added by editing the list');
    const bad = node.agent.problems().find((p) => p.message.includes('no spaces allowed'));
    assert.ok(bad, 'the bad entry is named in a problem');
    assert.equal(bad.code, 'LM_ERR_CONSUL_INVALID_DATA');

    await kvPut(consul, key, '["web", ');
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(routed(node).join(), 'api,web', 'a value that does not parse keeps the last good list');

    await consul.api('DELETE', `/v1/kv/${key}`);
    await eventually(() => routed(node).length === 0, 10_000, 'nothing routed once the key is gone');
    const missing = node.agent.problems().find((p) => p.code === 'LM_ERR_SERVICES_KV_MISSING');
    assert.match(missing?.message ?? '', /loopmesh\/services\/node-a/);
  });

  test('--services-kv with Consul unreachable: the node says it cannot read the list (status, problems, health degraded) and routes nothing', async () => {
    const node = await startAgent('http://127.0.0.1:1', { servicesKv: 'loopmesh/services/nowhere' });
    nodes.push(node);
    await eventually(() => node.agent.problems().find((p) => /cannot read the list of services to route from Consul KV loopmesh\/services\/nowhere/.test(p.message)), 10_000, 'the problem named');
    assert.equal(node.agent.watcher.status().connected, false);
    assert.match(node.agent.watcher.status().lastError?.message ?? '', /loopmesh\/services\/nowhere/);
    assert.equal(node.agent.health().status, 'degraded');
    assert.deepEqual(routed(node), []);
  });
});
