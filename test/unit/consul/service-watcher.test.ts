import { test } from 'node:test';
import assert from 'node:assert/strict';
import { silentLogger } from '../../../agent/log.js';
import { ServiceWatcher } from '../../../agent/consul/service-watcher.js';
import type { QueryResult, ReadOptions } from '../../../agent/consul/client.js';
import type { Catalog, CatalogProblem } from '../../../agent/consul/catalog.js';
import { eventually } from '../../support/net.js';

/**
 * A scripted reader, not a Consul stand-in: the integration test (watch-modes) runs this mode
 * against a real Consul. Here each service's answer is set by hand so that a wrong-shaped answer
 * comes exactly when wanted; `set` ends that service's long poll, as a change in Consul does.
 */
class Answers {
  readonly url = 'scripted';
  private readonly bodies = new Map<string, unknown>();
  private readonly versions = new Map<string, bigint>();
  private readonly waiters = new Map<string, Array<() => void>>();

  set(name: string, body: unknown): void {
    this.bodies.set(name, body);
    this.versions.set(name, (this.versions.get(name) ?? 10n) + 1n);
    for (const wake of this.waiters.get(name)?.splice(0) ?? []) wake();
  }

  async healthService(name: string, opts: ReadOptions = {}): Promise<QueryResult> {
    const version = this.versions.get(name) ?? 10n;
    if (opts.index !== undefined && opts.index >= version) {
      await new Promise<void>((resolve, reject) => {
        const list = this.waiters.get(name) ?? [];
        list.push(resolve);
        this.waiters.set(name, list);
        opts.signal?.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
      });
    }
    return { body: this.bodies.get(name) ?? [], index: this.versions.get(name) ?? 10n, knownLeader: true };
  }
}

const instance = (service: string, id: string, port: number) => ({ Node: { Node: 'n1', Address: '10.0.0.1' }, Service: { ID: id, Service: service, Port: port }, Checks: [{ Status: 'passing' }] });

test('per-service polls: the first catalog waits for every service; a wrong-shaped answer keeps the last good instances and marks only that service stale; a service with no registration is left out', async (t) => {
  const answers = new Answers();
  answers.set('web', [instance('web', 'web-1', 8080)]);
  answers.set('db', [instance('db', 'db-1', 5432)]);
  const catalogs: Catalog[] = [];
  let problems: CatalogProblem[] = [];
  const watcher = new ServiceWatcher({ client: answers, logger: silentLogger(), filter: { allowWarning: false }, waitMs: 30_000, onCatalog: (c) => catalogs.push(c), onProblems: (p) => (problems = p) });
  watcher.setServices(['web', 'db', 'absent']);
  watcher.start();
  t.after(() => watcher.stop());
  await watcher.ready;
  assert.deepEqual([...(catalogs[0]?.keys() ?? [])], ['db', 'web'], 'the first catalog has both, and not the service with no registration');

  answers.set('web', { not: 'an array' });
  await eventually(() => watcher.stale().has('web'), 5000, 'web marked stale');
  assert.match(watcher.stale().get('web')?.message ?? '', /service "web" is stale: Consul's answer had the wrong shape: .*its last good read \(1 healthy instance\) stays in service/);
  assert.equal(catalogs.at(-1)?.get('web')?.[0]?.port, 8080, 'the last good instances stay');
  assert.ok(problems.some((p) => p.code === 'LM_ERR_CONSUL_STALE' && p.service === 'web'));

  answers.set('db', [instance('db', 'db-1', 5433)]);
  await eventually(() => catalogs.at(-1)?.get('db')?.[0]?.port === 5433, 5000, 'db changes meanwhile');

  answers.set('web', [instance('web', 'web-1', 8081)]);
  await eventually(() => catalogs.at(-1)?.get('web')?.[0]?.port === 8081, 15_000, 'web read again after its backoff');
  assert.equal(watcher.stale().size, 0);

  watcher.setServices(['db']);
  await eventually(() => !catalogs.at(-1)?.has('web'), 5000, 'web dropped when the list drops it');
  assert.deepEqual(watcher.services(), ['db']);
});
