import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Agent } from '../../agent/agent.js';
import { TestConsul } from '../support/consul.js';
import { captureLogger } from '../support/log.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { removeDir, startAgent } from '../support/agent.js';
import { health, kvTable, served } from '../support/served.js';

/** Faults of the address table (issue 7, findings 1 and 2): a real Consul, a real agent, real sockets. */

const key = '/v1/kv/loopmesh/addresses';

function addressesOf(agent: Agent): Record<string, string> {
  return Object.fromEntries([...served(agent)].map(([name, s]) => [name, s.address]));
}

/** Every service of `names` listening on its own address, none shared. */
function allListeningApart(agent: Agent, names: string[]): boolean {
  const s = served(agent);
  if (!names.every((n) => s.get(n)?.listening)) return false;
  const addresses = names.map((n) => s.get(n)!.address);
  return new Set(addresses).size === addresses.length;
}

describe('faults: the address table', { timeout: 180_000 }, () => {
  let consul: TestConsul;
  let backend: IdServer;
  let port: number;
  let node: Awaited<ReturnType<typeof startAgent>>;
  const log = captureLogger('info');

  const register = (name: string): Promise<void> => consul.register({ id: `${name}-1`, name, port: backend.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });

  before(async () => {
    consul = await TestConsul.start();
    backend = await startIdServer('backend');
    port = await freePort();
    await register('web');
    await register('api');
    node = await startAgent(consul.url, {}, undefined, log.logger);
    await eventually(() => allListeningApart(node.agent, ['web', 'api']), 10_000, 'web and api listening');
  });

  after(async () => {
    await node?.stop().catch(() => undefined);
    await backend?.close();
    await consul?.close();
    if (node) await removeDir(node.dir);
  });

  test('KV table lost: the node restores it from what it serves, and a new service never gets an address in use', async () => {
    const before = addressesOf(node.agent);
    await consul.api('DELETE', key);
    // Repaired without waiting for any catalog change: the agent follows the key.
    await eventually(async () => {
      const kv = await kvTable(consul);
      return kv?.web === before.web && kv?.api === before.api;
    }, 10_000, 'KV table restored from the node');
    await register('db');
    await eventually(() => allListeningApart(node.agent, ['web', 'api', 'db']), 10_000, 'db listening on an address of its own');
    const now = addressesOf(node.agent);
    assert.equal(now.web, before.web, 'web kept its address');
    assert.equal(now.api, before.api, 'api kept its address');
    assert.deepEqual(await kvTable(consul), now);
    assert.equal(await whoAnswers(now.db!, port), 'backend');
    assert.equal((await health(node.agent)).code, 200);
  });

  test('KV rolled back with an address given to another service: resolved, reported, and changes keep flowing', async () => {
    const before = addressesOf(node.agent);
    // An older snapshot restored: api is missing, and its address was handed to "cache" meanwhile.
    await consul.api('PUT', key, { version: 1, addresses: { web: before.web, db: before.db, cache: before.api } });
    await register('cache');
    await eventually(() => allListeningApart(node.agent, ['web', 'api', 'db', 'cache']), 10_000, 'every service listening apart');
    const now = addressesOf(node.agent);
    assert.equal(now.cache, before.api, "KV wins: cache has the address KV gave it");
    assert.notEqual(now.api, before.api, 'api moved off the address it lost');
    assert.ok(log.lines.some((l) => l.code === 'LM_ERR_PLAN_ADDRESS_CONFLICT' && String(l.msg).includes('"api"')), 'the conflict is logged with its code and the service');
    // Not frozen on it: another change still reaches the balancer.
    await register('queue');
    await eventually(() => allListeningApart(node.agent, ['web', 'api', 'db', 'cache', 'queue']), 10_000, 'queue listening after the conflict');
    await eventually(async () => (await health(node.agent)).code === 200, 10_000, 'health ok once resolved');
    const kv = (await kvTable(consul))!;
    assert.equal(new Set(Object.values(kv)).size, Object.keys(kv).length, 'KV holds no address twice');
  });

  test('KV entries outside the range (0.0.0.0, an off-host address) are never bound or published, and KV is repaired', async () => {
    const before = addressesOf(node.agent);
    await consul.api('PUT', key, { version: 1, addresses: { ...before, web: '0.0.0.0', api: '10.1.2.3' } });
    await eventually(async () => {
      const kv = await kvTable(consul);
      return kv?.web === before.web && kv?.api === before.api;
    }, 10_000, 'KV repaired with the addresses the node serves');
    const now = served(node.agent);
    assert.equal(now.get('web')?.address, before.web);
    assert.equal(now.get('api')?.address, before.api);
    const hosts = await readFile(join(node.dir, 'hosts'), 'utf8');
    assert.doesNotMatch(hosts, /0\.0\.0\.0|10\.1\.2\.3/, 'never published');
    const balancerJson = await readFile(join(node.agent.config.runDir, 'balancer.json'), 'utf8');
    assert.doesNotMatch(balancerJson, /0\.0\.0\.0|10\.1\.2\.3/, 'never rendered');
    assert.ok(log.lines.some((l) => l.code === 'LM_ERR_PLAN_ADDRESS_INVALID' && String(l.msg).includes('0.0.0.0')), 'the bad value is named in the log');
  });

  test('a KV value that is not a table at all is replaced by the node\'s table', async () => {
    const before = addressesOf(node.agent);
    await consul.api('PUT', key, 'not json');
    await eventually(async () => (await kvTable(consul).catch(() => undefined))?.web === before.web, 10_000, 'KV rewritten');
    assert.deepEqual(addressesOf(node.agent), before);
  });

  test('a service named "constructor" (a member of every JS object) gets an address, and no other service is held up', async () => {
    await register('constructor');
    await register('tostring');
    await eventually(() => allListeningApart(node.agent, ['web', 'api', 'constructor', 'tostring']), 10_000, 'constructor and tostring listening apart');
    assert.equal(await whoAnswers(served(node.agent).get('constructor')!.address, port), 'backend');
    await register('after-constructor');
    await eventually(() => allListeningApart(node.agent, ['constructor', 'after-constructor']), 10_000, 'a later service still arrives');
  });

  test('a tampered local cache is checked at start: bad entries are dropped, never bound', async () => {
    await node.stop();
    const cache = join(node.agent.config.runDir, 'addresses.json');
    const doc = JSON.parse(await readFile(cache, 'utf8')) as { addresses: Record<string, string> };
    const { writeFile } = await import('node:fs/promises');
    await writeFile(cache, JSON.stringify({ version: 1, addresses: { ...doc.addresses, evil: '0.0.0.0', twin: doc.addresses.web } }));
    await consul.register({ id: 'evil-1', name: 'evil', port: backend.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
    await consul.register({ id: 'twin-1', name: 'twin', port: backend.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
    node = await startAgent(consul.url, {}, node.dir, log.logger);
    await eventually(() => allListeningApart(node.agent, ['web', 'api', 'evil', 'twin']), 10_000, 'evil and twin on addresses of their own');
    assert.notEqual(served(node.agent).get('evil')?.address, '0.0.0.0');
  });
});

describe("faults: the address table outgrows Consul's KV value size limit", { timeout: 120_000 }, () => {
  // Small enough that a few services fill it: the table is written whole on every allocation.
  const limit = 600;

  test('services that have an address keep serving; the others are named, with the 413 and the setting to raise', async () => {
    const consul = await TestConsul.start({ hcl: `limits { kv_max_value_size = ${limit} }` });
    const backend = await startIdServer('backend');
    const port = await freePort();
    let node: Awaited<ReturnType<typeof startAgent>> | undefined;
    try {
      const register = (name: string): Promise<void> => consul.register({ id: `${name}-1`, name, port: backend.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
      const early = ['web', 'api'];
      for (const name of early) await register(name);
      const agent = (node = await startAgent(consul.url, {}, undefined, captureLogger('info').logger)).agent;
      await eventually(() => allListeningApart(agent, early), 10_000, 'web and api listening');
      // Each entry is about 50 bytes: 20 of them cannot fit in 600.
      const late = Array.from({ length: 20 }, (_, i) => `a-service-with-a-long-name-${i}`);
      for (const name of late) await register(name);
      const problem = await eventually(async () => ((await health(agent)).reasons.find((r) => r.code === 'LM_ERR_PLAN_NO_ADDRESS') ? agent.problems().find((p) => p.code === 'LM_ERR_ADDRESS_TABLE_WRITE') : undefined), 10_000, 'the address table write refused and reported');
      process.stdout.write(`# ${problem.message}\n`);
      assert.match(problem.message, /413/);
      assert.match(problem.message, /kv_max_value_size/);
      assert.match(problem.message, /\d+ service\(s\) wait for an address/);
      const table = await kvTable(consul);
      assert.ok(table !== undefined && JSON.stringify(table).length < limit, 'KV still holds the last table that fit');
      // What had an address still serves, on the address KV gave it.
      for (const name of early) {
        assert.equal(served(agent).get(name)?.address, table[name]);
        assert.equal(await whoAnswers(table[name]!, port), 'backend');
      }
      assert.equal((await health(agent)).code, 503);
      // Room again (the late services deregistered): the problem clears by itself.
      for (const name of late) await consul.deregister(`${name}-1`);
      await eventually(async () => ((await health(agent)).code === 200 && !agent.problems().some((p) => p.code === 'LM_ERR_ADDRESS_TABLE_WRITE') ? true : undefined), 10_000, 'healthy again once the services that did not fit are gone');
    } finally {
      await node?.stop().catch(() => undefined);
      await Promise.all([backend.close(), consul.close()]);
      if (node) await removeDir(node.dir);
    }
  });
});
