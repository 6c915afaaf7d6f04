import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ConsulClient } from '../../agent/consul/client.js';
import { CatalogWatcher } from '../../agent/consul/catalog-watcher.js';
import type { Catalog } from '../../agent/consul/catalog.js';
import { silentLogger } from '../../agent/log.js';
import { TestConsul } from '../support/consul.js';
import { eventually } from '../support/net.js';

// What one change costs the watcher, with a real Consul: reads of the services the change touched,
// not of the catalog. Every kind of change the issue names must be seen; the kinds Consul's service
// list and check list cannot show (an address, port or meta change with the same tags and checks)
// are found by one sweep, and the test says so by counting it.

const services = 30;

describe('catalog watcher: one change costs the services it touched', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let client: ConsulClient;
  let watcher: CatalogWatcher;
  let catalog: Catalog = new Map();

  before(async () => {
    consul = await TestConsul.start();
    for (let i = 0; i < services; i++) await consul.register({ id: `svc${i}-1`, name: `svc${i}`, port: 8000 + i, ttlCheck: { passing: true } });
    client = new ConsulClient({ url: consul.url });
    watcher = new CatalogWatcher({ client, logger: silentLogger(), selection: { services: [], tag: undefined }, filter: { allowWarning: false }, waitMs: 30_000, onCatalog: (c) => (catalog = c) });
    watcher.start();
    await eventually(() => (catalog.size === services && [...catalog.values()].every((i) => i.length === 1) ? true : undefined), 20_000, 'the first full sync');
  });

  test('the first full sync reads each service once (the check list\'s first answer does not read them all again)', async () => {
    await new Promise((r) => setTimeout(r, 500));
    const reads = watcher.status().serviceReads ?? 0;
    process.stdout.write(`# watch cost: first full sync: ${reads} service reads (${services} services)\n`);
    assert.ok(reads >= services && reads <= services + 2, `${reads} reads`);
  });

  after(async () => {
    await watcher?.stop();
    client?.close();
    await consul?.close();
  });

  /** Runs a change, waits until the catalog shows it, and returns the reads and sweeps it cost. */
  async function cost(what: string, change: () => Promise<void>, seen: (c: Catalog) => boolean): Promise<{ reads: number; sweeps: number; probes: number; nodeReads: number }> {
    // Quiet first: nothing else in flight.
    await new Promise((r) => setTimeout(r, 300));
    const before = watcher.status();
    await change();
    await eventually(() => (seen(catalog) ? true : undefined), 10_000, what);
    // Past the look for a change hidden behind an explained one (1 s after a list change): part of its cost.
    await new Promise((r) => setTimeout(r, 1_400));
    const now = watcher.status();
    const spent = { reads: (now.serviceReads ?? 0) - (before.serviceReads ?? 0), sweeps: (now.sweeps ?? 0) - (before.sweeps ?? 0), probes: (now.probes ?? 0) - (before.probes ?? 0), nodeReads: (now.nodeReads ?? 0) - (before.nodeReads ?? 0) };
    process.stdout.write(`# watch cost: ${what}: ${spent.reads} service reads, ${spent.probes} filtered list queries, ${spent.nodeReads} node reads, ${spent.sweeps} sweeps (${services} services)\n`);
    return spent;
  }

  test('a new service: one read', async () => {
    const c = await cost('new service', () => consul.register({ id: 'fresh-1', name: 'fresh', port: 9100, ttlCheck: { passing: true } }), (x) => x.get('fresh')?.length === 1);
    assert.ok(c.reads <= 2, `${c.reads} reads`);
    assert.equal(c.sweeps, 0);
  });

  test('a service deregistered: no read of the others', async () => {
    const c = await cost('service deregistered', () => consul.deregister('fresh-1'), (x) => !x.has('fresh'));
    assert.ok(c.reads <= 1, `${c.reads} reads`);
    assert.equal(c.sweeps, 0);
  });

  test('a health flip: one read', async () => {
    const c = await cost('health flip (check fails)', () => consul.setCheck('svc3-1', 'fail'), (x) => x.get('svc3')?.length === 0);
    assert.ok(c.reads <= 2, `${c.reads} reads`);
    assert.equal(c.sweeps, 0);
    await consul.setCheck('svc3-1', 'pass');
    await eventually(() => (catalog.get('svc3')?.length === 1 ? true : undefined), 10_000, 'svc3 passing again');
  });

  test('a new instance of an existing service (with a check): one read', async () => {
    const c = await cost('new instance with a check', () => consul.register({ id: 'svc4-2', name: 'svc4', port: 9104, ttlCheck: { passing: true } }), (x) => x.get('svc4')?.length === 2);
    assert.ok(c.reads <= 2, `${c.reads} reads`);
    assert.equal(c.sweeps, 0);
  });

  test('a tag change: one read', async () => {
    const c = await cost('tag change', () => consul.register({ id: 'svc5-1', name: 'svc5', port: 8005, tags: ['v2'], ttlCheck: { passing: true } }), (x) => x.get('svc5')?.[0]?.tags.includes('v2') === true);
    assert.ok(c.reads <= 2, `${c.reads} reads`);
    assert.equal(c.sweeps, 0);
  });

  test('an address change with the same tags and check (invisible to both lists): found by one filtered list query, one read', async () => {
    const c = await cost('address change (re-registration, same tags and check)', () => consul.register({ id: 'svc6-1', name: 'svc6', port: 8006, address: '127.0.0.9', ttlCheck: { passing: true } }), (x) => x.get('svc6')?.[0]?.address === '127.0.0.9');
    assert.equal(c.sweeps, 0);
    assert.equal(c.probes, 1);
    assert.ok(c.reads <= 2, `${c.reads} reads`);
  });

  test('a port change and a new instance without a check: found the same way', async () => {
    const port = await cost('port change', () => consul.register({ id: 'svc8-1', name: 'svc8', port: 9808, ttlCheck: { passing: true } }), (x) => x.get('svc8')?.[0]?.port === 9808);
    assert.equal(port.sweeps, 0);
    assert.ok(port.reads <= 2, `${port.reads} reads`);
    const bare = await cost('new instance without a check', () => consul.register({ id: 'svc9-2', name: 'svc9', port: 9909 }), (x) => x.get('svc9')?.length === 2);
    assert.equal(bare.sweeps, 0);
    assert.ok(bare.reads <= 2, `${bare.reads} reads`);
  });

  test('a meta change (same tags, check, address and port): the probe finds nothing, one node read finds it (its ModifyIndex moved), no sweep', async () => {
    const c = await cost('meta change', () => consul.register({ id: 'svc7-1', name: 'svc7', port: 8007, meta: { version: '2' }, ttlCheck: { passing: true } }), (x) => x.get('svc7')?.[0]?.meta.version === '2');
    assert.equal(c.sweeps, 0);
    assert.equal(c.nodeReads, 1, 'one node holds every instance here');
    assert.ok(c.reads <= 2, `${c.reads} reads`);
  });

  test('without the filtered probe (as above 1,000 registrations): an address change and a removed instance without a check are found by a node read, not a sweep', async () => {
    // The same client without catalogServicesFiltered: the watcher takes the path it takes at scale.
    const atScale = { url: client.url, catalogServices: client.catalogServices.bind(client), healthState: client.healthState.bind(client), healthService: client.healthService.bind(client), catalogNode: client.catalogNode.bind(client) };
    let seen: Catalog = new Map();
    const big = new CatalogWatcher({ client: atScale, logger: silentLogger(), selection: { services: [], tag: undefined }, filter: { allowWarning: false }, waitMs: 30_000, onCatalog: (c) => (seen = c) });
    big.start();
    try {
      await eventually(() => (seen.get('svc10')?.length === 1 ? true : undefined), 20_000, 'the first sync');
      await new Promise((r) => setTimeout(r, 500));
      const before = big.status();
      await consul.register({ id: 'svc10-1', name: 'svc10', port: 8010, address: '127.0.0.10', ttlCheck: { passing: true } });
      await eventually(() => (seen.get('svc10')?.[0]?.address === '127.0.0.10' ? true : undefined), 10_000, 'svc10 at its new address');
      await consul.deregister('svc9-2');
      await eventually(() => (seen.get('svc9')?.length === 1 ? true : undefined), 10_000, 'svc9 down to one instance');
      await new Promise((r) => setTimeout(r, 300));
      const now = big.status();
      const nodeReads = (now.nodeReads ?? 0) - (before.nodeReads ?? 0);
      const reads = (now.serviceReads ?? 0) - (before.serviceReads ?? 0);
      process.stdout.write(`# watch cost: at scale (no probe): address change + removed instance without a check: ${reads} service reads, ${nodeReads} node reads, ${(now.sweeps ?? 0) - (before.sweeps ?? 0)} sweeps\n`);
      assert.equal((now.sweeps ?? 0) - (before.sweeps ?? 0), 0, 'no sweep');
      assert.equal(nodeReads, 2, 'one node read per change');
      assert.ok(reads <= 4, `${reads} reads`);
    } finally {
      await big.stop();
    }
  });

  test('an address move in the same transaction as a new service (the one answer shows only the new service): found by the look that follows, no sweep', async () => {
    const svc = (id: string, name: string, address: string): unknown => ({ Service: { Verb: 'set', Node: 'side', Service: { ID: id, Service: name, Address: address, Port: 7000 } } });
    await consul.api('PUT', '/v1/txn', [{ Node: { Verb: 'set', Node: { Node: 'side', Address: '10.8.0.1' } } }, svc('moving-1', 'moving', '10.8.0.5')]);
    await eventually(() => (catalog.get('moving')?.[0]?.address === '10.8.0.5' ? true : undefined), 10_000, 'moving at 10.8.0.5');
    const c = await cost('address move hidden behind a new service (one transaction)', () => consul.api('PUT', '/v1/txn', [svc('newcomer-1', 'newcomer', '10.8.0.7'), svc('moving-1', 'moving', '10.8.0.6')]).then(() => undefined), (x) => x.has('newcomer') && x.get('moving')?.[0]?.address === '10.8.0.6');
    assert.equal(c.sweeps, 0);
    assert.ok(c.reads <= 3, `${c.reads} reads`);
    await consul.api('PUT', '/v1/txn', [{ Node: { Verb: 'delete', Node: { Node: 'side' } } }]);
    await eventually(() => (!catalog.has('moving') && !catalog.has('newcomer') ? true : undefined), 10_000, 'the side node gone');
  });

  test('with a change signal per node: a meta change in the same transaction as a new service (the probe cannot see meta) is found by the look that follows, no sweep', async () => {
    const svc = (id: string, name: string, meta: Record<string, string>): unknown => ({ Service: { Verb: 'set', Node: 'side2', Service: { ID: id, Service: name, Address: '10.9.0.5', Port: 7000, Meta: meta } } });
    let seen: Catalog = new Map();
    const signalled = new CatalogWatcher({ client, logger: silentLogger(), selection: { services: [], tag: undefined }, filter: { allowWarning: false }, waitMs: 30_000, maxNodeSignals: 10, onCatalog: (c) => (seen = c) });
    signalled.start();
    try {
      await consul.api('PUT', '/v1/txn', [{ Node: { Verb: 'set', Node: { Node: 'side2', Address: '10.9.0.1' } } }, svc('meta-1', 'metasvc', { version: '1' })]);
      await eventually(() => (seen.get('metasvc')?.[0]?.meta.version === '1' && (signalled.status().nodeSignals ?? 0) >= 2 ? true : undefined), 10_000, 'metasvc with version 1, and a signal for both nodes');
      // Past the look after metasvc's own registration: what follows is the transaction's alone.
      await new Promise((r) => setTimeout(r, 1_500));
      const before = signalled.status();
      await consul.api('PUT', '/v1/txn', [svc('meta-new-1', 'metanew', {}), svc('meta-1', 'metasvc', { version: '2' })]);
      await eventually(() => (seen.has('metanew') && seen.get('metasvc')?.[0]?.meta.version === '2' ? true : undefined), 5_000, 'metanew, and metasvc with version 2');
      const now = signalled.status();
      process.stdout.write(`# watch cost: a meta change hidden behind a new service, with node signals: ${(now.serviceReads ?? 0) - (before.serviceReads ?? 0)} service reads, ${(now.probes ?? 0) - (before.probes ?? 0)} filtered list queries, ${(now.nodeReads ?? 0) - (before.nodeReads ?? 0)} node reads, ${(now.sweeps ?? 0) - (before.sweeps ?? 0)} sweeps\n`);
      assert.equal((now.sweeps ?? 0) - (before.sweeps ?? 0), 0, 'no sweep');
      assert.ok((now.nodeReads ?? 0) - (before.nodeReads ?? 0) <= 2, 'the signalled node read, not more than both');
    } finally {
      await signalled.stop();
      await consul.api('PUT', '/v1/txn', [{ Node: { Verb: 'delete', Node: { Node: 'side2' } } }]);
    }
  });

  test('a node-level check (node maintenance): the services on that node are read', async () => {
    const c = await cost('node maintenance on', () => consul.api('PUT', '/v1/agent/maintenance?enable=true&reason=test').then(() => undefined), (x) => [...x.values()].every((i) => i.length === 0));
    assert.equal(c.sweeps, 0);
    await consul.api('PUT', '/v1/agent/maintenance?enable=false');
    await eventually(() => (catalog.get('svc1')?.length === 1 ? true : undefined), 10_000, 'maintenance off');
  });
});

describe('catalog watcher on a large catalog (1,250 registrations on 5 nodes): only the checks not passing are watched', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let client: ConsulClient;
  let watcher: CatalogWatcher;
  let catalog: Catalog = new Map();
  const serviceCount = 250;

  before(async () => {
    consul = await TestConsul.start();
    const txn = async (ops: unknown[]): Promise<void> => {
      for (let i = 0; i < ops.length; i += 64) await consul.api('PUT', '/v1/txn', ops.slice(i, i + 64));
    };
    await txn(Array.from({ length: 5 }, (_, k) => ({ Node: { Verb: 'set', Node: { Node: `big${k}`, Address: `10.9.0.${k + 1}` } } })));
    const ops: unknown[] = [];
    for (let s = 0; s < serviceCount; s++) {
      for (let k = 0; k < 5; k++) {
        ops.push({ Service: { Verb: 'set', Node: `big${k}`, Service: { ID: `b${s}-${k}`, Service: `b${s}`, Port: 7000 } } });
        ops.push({ Check: { Verb: 'set', Check: { Node: `big${k}`, CheckID: `c-b${s}-${k}`, Name: 'c', Status: 'passing', ServiceID: `b${s}-${k}`, ServiceName: `b${s}` } } });
      }
    }
    await txn(ops);
    client = new ConsulClient({ url: consul.url });
    watcher = new CatalogWatcher({ client, logger: silentLogger(), selection: { services: [], tag: undefined }, filter: { allowWarning: false }, waitMs: 30_000, onCatalog: (c) => (catalog = c) });
    watcher.start();
    await eventually(() => (catalog.size >= serviceCount && catalog.get(`b${serviceCount - 1}`)?.length === 5 ? true : undefined), 30_000, 'the first full sync');
    await eventually(() => (watcher.status().checkList === 'not-passing' ? true : undefined), 10_000, 'the filtered check list');
  });

  after(async () => {
    await watcher?.stop();
    client?.close();
    await consul?.close();
  });

  const setCheck = (s: number, k: number, status: string) => consul.api('PUT', '/v1/txn', [{ Check: { Verb: 'set', Check: { Node: `big${k}`, CheckID: `c-b${s}-${k}`, Name: 'c', Status: status, ServiceID: `b${s}-${k}`, ServiceName: `b${s}` } } }]);

  test('a health flip either way is seen through the filtered list with one read; no sweep', async () => {
    await new Promise((r) => setTimeout(r, 500));
    const before = watcher.status();
    await setCheck(7, 2, 'critical');
    await eventually(() => (catalog.get('b7')?.length === 4 ? true : undefined), 10_000, 'b7 down to 4');
    await setCheck(7, 2, 'passing');
    await eventually(() => (catalog.get('b7')?.length === 5 ? true : undefined), 10_000, 'b7 back to 5');
    await new Promise((r) => setTimeout(r, 300));
    const now = watcher.status();
    const reads = (now.serviceReads ?? 0) - (before.serviceReads ?? 0);
    process.stdout.write(`# watch cost: large catalog, flip and back: ${reads} service reads, ${(now.nodeReads ?? 0) - (before.nodeReads ?? 0)} node reads, ${(now.sweeps ?? 0) - (before.sweeps ?? 0)} sweeps\n`);
    assert.ok(reads >= 2 && reads <= 4, `${reads} reads`);
    assert.equal((now.sweeps ?? 0) - (before.sweeps ?? 0), 0);
  });

  test('a new instance with a passing check (invisible to the filtered list) and its removal are found by node reads; no sweep', async () => {
    const before = watcher.status();
    await consul.api('PUT', '/v1/txn', [
      { Service: { Verb: 'set', Node: 'big1', Service: { ID: 'b9-extra', Service: 'b9', Port: 7100 } } },
      { Check: { Verb: 'set', Check: { Node: 'big1', CheckID: 'c-b9-extra', Name: 'c', Status: 'passing', ServiceID: 'b9-extra', ServiceName: 'b9' } } },
    ]);
    await eventually(() => (catalog.get('b9')?.length === 6 ? true : undefined), 10_000, 'b9 with its new instance');
    await consul.api('PUT', '/v1/txn', [{ Service: { Verb: 'delete', Node: 'big1', Service: { ID: 'b9-extra', Service: 'b9' } } }]);
    await eventually(() => (catalog.get('b9')?.length === 5 ? true : undefined), 10_000, 'b9 without it');
    await new Promise((r) => setTimeout(r, 300));
    const now = watcher.status();
    const nodeReads = (now.nodeReads ?? 0) - (before.nodeReads ?? 0);
    process.stdout.write(`# watch cost: large catalog, new instance and its removal: ${(now.serviceReads ?? 0) - (before.serviceReads ?? 0)} service reads, ${nodeReads} node reads, ${(now.sweeps ?? 0) - (before.sweeps ?? 0)} sweeps\n`);
    assert.equal((now.sweeps ?? 0) - (before.sweeps ?? 0), 0);
    assert.ok(nodeReads >= 5 && nodeReads <= 10, `${nodeReads} node reads (5 nodes, twice)`);
  });

  test('with a change signal per node (maxNodeSignals): an address change is found by reading the node it happened on, not all five', async () => {
    let seen: Catalog = new Map();
    const signalled = new CatalogWatcher({ client, logger: silentLogger(), selection: { services: [], tag: undefined }, filter: { allowWarning: false }, waitMs: 30_000, maxNodeSignals: 10, onCatalog: (c) => (seen = c) });
    signalled.start();
    try {
      await eventually(() => (seen.size >= serviceCount && signalled.status().nodeSignals === 5 ? true : undefined), 30_000, 'the first sync and a signal for each of the 5 nodes');
      await new Promise((r) => setTimeout(r, 500));
      // A signal's first answer marks its node changed (what happened before it is not known): the
      // first node sweep reads every node. Measure after one.
      const move = async (i: number): Promise<void> => {
        const k = i % 5;
        const address = `10.50.${i}.${k + 1}`;
        await consul.api('PUT', '/v1/txn', [{ Service: { Verb: 'set', Node: `big${k}`, Service: { ID: `b${20 + i}-${k}`, Service: `b${20 + i}`, Port: 7000, Address: address } } }]);
        await eventually(() => (seen.get(`b${20 + i}`)?.some((x) => x.address === address) ? true : undefined), 10_000, `b${20 + i} at ${address}`);
        await new Promise((r) => setTimeout(r, 200));
      };
      await move(0);
      const before = signalled.status();
      const changes = 4;
      for (let i = 1; i <= changes; i++) await move(i);
      const now = signalled.status();
      const nodeReads = (now.nodeReads ?? 0) - (before.nodeReads ?? 0);
      process.stdout.write(`# watch cost: large catalog with node signals: ${changes} address changes on different nodes: ${(now.serviceReads ?? 0) - (before.serviceReads ?? 0)} service reads, ${nodeReads} node reads, ${(now.sweeps ?? 0) - (before.sweeps ?? 0)} sweeps\n`);
      assert.equal((now.sweeps ?? 0) - (before.sweeps ?? 0), 0, 'no sweep');
      // Without signals each change reads all 5 nodes (20); a signal late for one change costs 4 more.
      assert.ok(nodeReads >= changes && nodeReads <= changes + 4, `${nodeReads} node reads for ${changes} changes`);
      // A move hidden behind a new service in one transaction: the signalled node is read a moment later.
      const s0 = signalled.status();
      await consul.api('PUT', '/v1/txn', [
        { Service: { Verb: 'set', Node: 'big3', Service: { ID: 'hidden-new-3', Service: 'hidden-new', Port: 7000 } } },
        { Service: { Verb: 'set', Node: 'big3', Service: { ID: 'b40-3', Service: 'b40', Port: 7000, Address: '10.51.0.3' } } },
      ]);
      await eventually(() => (seen.has('hidden-new') && seen.get('b40')?.some((x) => x.address === '10.51.0.3') ? true : undefined), 5_000, 'hidden-new, and b40 at 10.51.0.3');
      const s1 = signalled.status();
      process.stdout.write(`# watch cost: large catalog with node signals: a move hidden behind a new service: ${(s1.serviceReads ?? 0) - (s0.serviceReads ?? 0)} service reads, ${(s1.nodeReads ?? 0) - (s0.nodeReads ?? 0)} node reads, ${(s1.sweeps ?? 0) - (s0.sweeps ?? 0)} sweeps\n`);
      assert.equal((s1.sweeps ?? 0) - (s0.sweeps ?? 0), 0, 'no sweep');
      // The other watcher (no signals) holds none.
      assert.equal(watcher.status().nodeSignals ?? 0, 0);
    } finally {
      await signalled.stop();
    }
  });
});
