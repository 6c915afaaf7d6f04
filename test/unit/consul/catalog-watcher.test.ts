import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConsulError, codes } from '../../../agent/errors.js';
import { silentLogger } from '../../../agent/log.js';
import { CatalogWatcher, type CatalogReader } from '../../../agent/consul/catalog-watcher.js';
import type { QueryResult, ReadOptions } from '../../../agent/consul/client.js';
import type { Catalog, CatalogProblem } from '../../../agent/consul/catalog.js';
import { eventually } from '../../support/net.js';

/** A long poll with nothing new: it blocks until the watcher stops (aborts) it. */
function blockUntilAborted(opts: ReadOptions): Promise<QueryResult> {
  return new Promise((_, reject) => opts.signal?.addEventListener('abort', () => reject(new Error('aborted')), { once: true }));
}

test('one failed health read does not leave the watcher "disconnected" while its long polls block with nothing new', async (t) => {
  // A scripted reader, not a Consul stand-in: it produces one timing fault that a real Consul cannot
  // be made to produce on demand (the long polls answer, then the very next health read fails, as
  // seen in the lab right after a Consul server restart), and then blocks as a quiet cluster does.
  let healthReads = 0;
  const reader: CatalogReader = {
    url: 'scripted',
    catalogServices: async (opts = {}) => (opts.index === undefined ? { body: { web: [] }, index: 10n, knownLeader: true } : blockUntilAborted(opts)),
    healthState: async (opts = {}) => (opts.index === undefined ? { body: [], index: 10n, knownLeader: true } : blockUntilAborted(opts)),
    healthService: async () => {
      healthReads += 1;
      if (healthReads === 1) throw new ConsulError(codes.consulStatus, 'Consul at scripted answered health.service(web) with HTTP 500: internal server error');
      return {
        body: [{ Node: { Node: 'n1', Address: '10.0.0.1' }, Service: { ID: 'web-1', Service: 'web', Port: 8080 }, Checks: [{ Status: 'passing' }] }],
        index: 10n,
        knownLeader: true,
      };
    },
  };
  const catalogs: Catalog[] = [];
  const watcher = new CatalogWatcher({
    client: reader,
    logger: silentLogger(),
    selection: { services: [], tag: undefined },
    filter: { allowWarning: false },
    onCatalog: (c) => catalogs.push(c),
  });
  watcher.start();
  t.after(() => watcher.stop());
  await eventually(() => catalogs.at(-1)?.get('web')?.length === 1, 5000, 'web read again after the failed read');
  assert.equal(healthReads, 2);
  assert.equal(watcher.status().connected, true, 'connected again once a read succeeded');
  assert.equal(watcher.status().errors[codes.consulStatus], 1);
});

/**
 * A scripted reader, not a Consul stand-in: the fault suite runs these faults against a real Consul.
 * Here each answer is set by hand, so the timing (a change while a retry waits) is exact.
 * Assigning a field changes what the next read returns; `bump` also ends the long polls on that
 * endpoint, as a change in Consul does (each endpoint has its own index, as in Consul).
 */
class ScriptedReader implements CatalogReader {
  readonly url = 'scripted';
  services: unknown = {};
  checks: unknown = [];
  readonly health = new Map<string, unknown>();
  readonly healthReads = new Map<string, number>();
  private readonly versions = { services: 10n, checks: 10n };
  private readonly waiters = { services: [] as Array<() => void>, checks: [] as Array<() => void> };

  bump(endpoint: 'services' | 'checks'): void {
    this.versions[endpoint] += 1n;
    for (const wake of this.waiters[endpoint].splice(0)) wake();
  }

  private async poll(endpoint: 'services' | 'checks', opts: ReadOptions = {}): Promise<QueryResult> {
    if (opts.index !== undefined && opts.index >= this.versions[endpoint]) {
      await new Promise<void>((resolve, reject) => {
        this.waiters[endpoint].push(resolve);
        opts.signal?.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
      });
    }
    return { body: endpoint === 'services' ? this.services : this.checks, index: this.versions[endpoint], knownLeader: true };
  }

  catalogServices(opts?: ReadOptions): Promise<QueryResult> {
    return this.poll('services', opts);
  }

  healthState(opts?: ReadOptions): Promise<QueryResult> {
    return this.poll('checks', opts);
  }

  async healthService(name: string): Promise<QueryResult> {
    this.healthReads.set(name, (this.healthReads.get(name) ?? 0) + 1);
    const body = this.health.get(name);
    if (body instanceof Error) throw body;
    return { body, index: this.versions.checks, knownLeader: true };
  }
}

const instance = (service: string, id: string, port: number) => ({
  Node: { Node: 'n1', Address: '10.0.0.1' },
  Service: { ID: id, Service: service, Port: port },
  Checks: [{ Status: 'passing' }],
});

/** A check state for each instance, so bumping one service's ModifyIndex dirties that service only. */
const checkOf = (service: string, modifyIndex: number) => ({ Node: 'n1', CheckID: `c-${service}`, ServiceName: service, Status: 'passing', ModifyIndex: modifyIndex });

function watch(reader: ScriptedReader) {
  const catalogs: Catalog[] = [];
  const problems: CatalogProblem[][] = [];
  const watcher = new CatalogWatcher({
    client: reader,
    logger: silentLogger(),
    selection: { services: [], tag: undefined },
    filter: { allowWarning: false },
    onCatalog: (c) => catalogs.push(c),
    onProblems: (p) => problems.push(p),
  });
  const ports = (service: string) => catalogs.at(-1)?.get(service)?.map((i) => i.port);
  return { watcher, catalogs, problems, ports };
}

test('a wrong-shaped health answer keeps the service, marks it stale, retries it alone; other services change meanwhile; the next good answer clears it', async (t) => {
  const reader = new ScriptedReader();
  reader.services = { web: [], db: [] };
  reader.checks = [checkOf('web', 1), checkOf('db', 1)];
  reader.health.set('web', [instance('web', 'web-1', 8080)]);
  reader.health.set('db', [instance('db', 'db-1', 5432)]);
  const { watcher, problems, ports } = watch(reader);
  watcher.start();
  t.after(() => watcher.stop());
  await eventually(() => ports('web')?.length === 1 && ports('db')?.length === 1, 5000, 'web and db read');

  reader.health.set('web', { Node: { Node: 'n1' }, Service: { ID: 'web-1' } });
  reader.checks = [checkOf('web', 2), checkOf('db', 1)];
  reader.bump('checks');
  const stale = await eventually(() => watcher.stale().get('web'), 5000, 'web marked stale');
  assert.equal(stale.code, codes.consulStale);
  assert.equal(stale.service, 'web');
  assert.match(stale.message, /^service "web" is stale: Consul's answer had the wrong shape: health\/service\/web: expected an array of \{Node, Service, Checks\} entries, got an object; its last good read \(1 healthy instance\) stays in service, retrying$/);
  assert.deepEqual(ports('web'), [8080], 'web keeps its last good instances');
  assert.ok(problems.at(-1)?.some((p) => p.code === codes.consulStale && p.service === 'web'), 'the stale mark is among the problems handed on');
  assert.equal(watcher.status().connected, true, 'Consul answered: not an outage');
  assert.ok((watcher.status().errors[codes.consulInvalidData] ?? 0) >= 1);

  // Retried by itself (nothing changed in Consul), with a growing pause: after 4 reads the next waits >= 1 s.
  await eventually(() => (reader.healthReads.get('web') ?? 0) >= 5, 10_000, 'web read again by the retry');
  const webReads = reader.healthReads.get('web') ?? 0;
  reader.health.set('db', [instance('db', 'db-1', 5432), instance('db', 'db-2', 5433)]);
  reader.checks = [checkOf('web', 2), checkOf('db', 2)];
  const changed = Date.now();
  reader.bump('checks');
  await eventually(() => ports('db')?.length === 2, 5000, 'db with its second instance');
  assert.ok(Date.now() - changed < 900, `db changed ${Date.now() - changed} ms after Consul did: it must not wait for web's retry`);
  assert.equal(reader.healthReads.get('web'), webReads, 'a change to db does not read web');
  assert.ok(watcher.stale().has('web'), 'still stale');

  reader.health.set('web', [instance('web', 'web-1', 8080), instance('web', 'web-2', 8081)]);
  await eventually(() => ports('web')?.length === 2, 15_000, 'web from the next good answer');
  assert.equal(watcher.stale().size, 0, 'the stale mark is cleared');
  assert.ok(!problems.at(-1)?.some((p) => p.code === codes.consulStale), 'and no longer reported');
});

test('a service whose first read is wrong-shaped or fails is left out (never published empty) and stale until a good read', async (t) => {
  const reader = new ScriptedReader();
  reader.services = { web: [], db: [], api: [] };
  reader.health.set('web', [instance('web', 'web-1', 8080), 'junk']);
  reader.health.set('api', new ConsulError(codes.consulStatus, 'Consul at scripted answered health.service(api) with HTTP 500: internal'));
  reader.health.set('db', [instance('db', 'db-1', 5432)]);
  const { watcher, catalogs, ports } = watch(reader);
  watcher.start();
  t.after(() => watcher.stop());
  await eventually(() => ports('db')?.length === 1, 5000, 'db read');
  await eventually(() => watcher.stale().size === 2, 5000, 'web and api stale');
  assert.equal(catalogs.at(-1)?.has('web'), false, 'web is not published with no backends');
  assert.equal(catalogs.at(-1)?.has('api'), false);
  assert.match(watcher.stale().get('web')?.message ?? '', /entry 1 of 2: expected an object with Node, Service and Checks, got "junk"; it is not routed until a good read/);
  assert.match(watcher.stale().get('api')?.message ?? '', /reading it from Consul failed \(LM_ERR_CONSUL_STATUS\): .*HTTP 500/);
  let ready = false;
  void watcher.ready.then(() => (ready = true));
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(ready, false, 'not ready while a service has never been read');
  reader.health.set('web', [instance('web', 'web-1', 8080)]);
  reader.health.set('api', [instance('api', 'api-1', 9000)]);
  await eventually(() => ports('web')?.length === 1 && ports('api')?.length === 1, 15_000, 'web and api once their reads are good');
  await watcher.ready;
  assert.equal(watcher.stale().size, 0);
});

test('wrong-shaped catalog/services or health/state answers keep everything and are read again without a change in Consul', async (t) => {
  const reader = new ScriptedReader();
  reader.services = { web: [] };
  reader.checks = [checkOf('web', 1)];
  reader.health.set('web', [instance('web', 'web-1', 8080)]);
  const { watcher, catalogs, ports } = watch(reader);
  watcher.start();
  t.after(() => watcher.stop());
  await eventually(() => ports('web')?.length === 1, 5000, 'web read');
  const emitted = catalogs.length;

  reader.services = ['web'];
  reader.checks = { web: 'passing' };
  reader.bump('services');
  reader.bump('checks');
  await eventually(() => (watcher.status().errors[codes.consulInvalidData] ?? 0) >= 2, 5000, 'both answers rejected');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(catalogs.length, emitted, 'nothing changed downstream');
  assert.deepEqual(ports('web'), [8080]);
  assert.equal(watcher.status().connected, true);
  assert.match(watcher.status().lastError?.message ?? '', /catalog\/services: expected an object|health\/state\/any: expected an array/);

  // Fixed without a new index: only a retry (a plain read, not a long poll on the rejected index) sees it.
  reader.health.set('api', [instance('api', 'api-1', 9000)]);
  reader.health.set('web', [instance('web', 'web-1', 8080), instance('web', 'web-2', 8081)]);
  reader.services = { web: [], api: [] };
  reader.checks = [checkOf('web', 2), checkOf('api', 1)];
  await eventually(() => ports('api')?.length === 1 && ports('web')?.length === 2, 15_000, 'api and the second web instance after the retry');
});

test('a sweep (a list change nothing explained) runs beside the targeted reads: a new service is live before the sweep ends', async (t) => {
  // Reads of the "slow" services take 1.5 s while `slow` is set: a sweep over them is long.
  class SlowReader extends ScriptedReader {
    slow = false;
    override async healthService(name: string): Promise<QueryResult> {
      if (this.slow && name.startsWith('slow')) await new Promise((r) => setTimeout(r, 1500));
      return super.healthService(name);
    }
  }
  const reader = new SlowReader();
  const names = ['slow0', 'slow1', 'slow2', 'slow3', 'web'];
  reader.services = Object.fromEntries(names.map((n) => [n, []]));
  reader.checks = names.map((n) => checkOf(n, 1));
  for (const [i, n] of names.entries()) reader.health.set(n, [instance(n, `${n}-1`, 8000 + i)]);
  const { watcher, catalogs, ports } = watch(reader);
  watcher.start();
  t.after(() => watcher.stop());
  await eventually(() => ports('web')?.[0] === 8004, 5000, 'the first sync');

  // The list's index moves and nothing explains it (no probe here): every service is read once.
  reader.slow = true;
  reader.bump('services');
  await eventually(() => (watcher.status().sweeps ?? 0) === 1, 5000, 'a sweep to start');
  const sweepStarted = performance.now();
  reader.services = Object.fromEntries([...names, 'fresh'].map((n) => [n, []]));
  reader.health.set('fresh', [instance('fresh', 'fresh-1', 9000)]);
  reader.bump('services');
  await eventually(() => ports('fresh')?.[0] === 9000, 5000, 'the new service live');
  const took = performance.now() - sweepStarted;
  assert.ok(took < 1200, `the new service came ${took.toFixed(0)} ms after the sweep started, before its 1.5 s reads ended`);
  assert.equal(catalogs.at(-1)?.has('slow0'), true, 'the services the sweep is reading stay in the catalog meanwhile');
  await eventually(() => (reader.healthReads.get('slow3') ?? 0) >= 2, 5000, 'the sweep to read slow3 as well');
});

test('a change nothing explains, arriving while the look for hidden changes is out, is still read once that look ends', async (t) => {
  // The probe (a filtered service list) answers slowly and finds nothing: the window is exact here.
  // Each service's own index, as Consul keeps one per service (a sweep takes only what moved).
  class SlowProbe extends ScriptedReader {
    readonly serviceIndex = new Map<string, bigint>();
    async catalogServicesFiltered(): Promise<QueryResult> {
      await new Promise((r) => setTimeout(r, 800));
      return { body: {}, index: 10n, knownLeader: true };
    }
    override async healthService(name: string): Promise<QueryResult> {
      return { ...(await super.healthService(name)), index: this.serviceIndex.get(name) ?? 10n };
    }
  }
  const reader = new SlowProbe();
  reader.services = { web: [] };
  reader.checks = [checkOf('web', 1)];
  reader.health.set('web', [instance('web', 'web-1', 8000)]);
  const { watcher, ports } = watch(reader);
  watcher.start();
  t.after(() => watcher.stop());
  await eventually(() => ports('web')?.[0] === 8000, 5000, 'the first sync');
  // A new service: explained by the list, so a look for hidden changes follows 1 s later.
  reader.services = { web: [], fresh: [] };
  reader.health.set('fresh', [instance('fresh', 'fresh-1', 9000)]);
  reader.bump('services');
  await eventually(() => ports('fresh')?.[0] === 9000, 5000, 'fresh live');
  await eventually(() => ((watcher.status().probes ?? 0) >= 1 ? true : undefined), 5000, 'the look (a probe) to start');
  // While it is out: web moves to another port, which only the list's index shows.
  reader.health.set('web', [instance('web', 'web-1', 8001)]);
  reader.serviceIndex.set('web', 20n);
  reader.bump('services');
  await eventually(() => ports('web')?.[0] === 8001, 5000, 'web at its new port');
});
