import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConsulError, codes } from '../../../agent/errors.js';
import { silentLogger } from '../../../agent/log.js';
import { CatalogWatcher, type CatalogReader } from '../../../agent/consul/catalog-watcher.js';
import type { QueryResult, ReadOptions } from '../../../agent/consul/client.js';
import type { Catalog } from '../../../agent/consul/catalog.js';
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
