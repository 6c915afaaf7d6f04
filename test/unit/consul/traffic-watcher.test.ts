import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ConsulClient } from '../../../agent/consul/client.js';
import { TrafficWatcher, parseKvList, readTrafficDocs, serviceOfKey, trafficDocs } from '../../../agent/consul/traffic-watcher.js';
import { codes } from '../../../agent/errors.js';
import { silentLogger } from '../../../agent/log.js';
import { TestConsul } from '../../support/consul.js';
import { eventually } from '../../support/net.js';

/** `consul kv put KEY TEXT`: the raw text as the value. */
async function kvPut(consul: TestConsul, key: string, text: string): Promise<void> {
  const res = await fetch(`${consul.url}/v1/kv/${key}`, { method: 'PUT', body: text, signal: AbortSignal.timeout(5000) });
  assert.equal(res.status, 200, `PUT ${key}: HTTP ${res.status}`);
}

async function kvDelete(consul: TestConsul, key: string): Promise<void> {
  const res = await fetch(`${consul.url}/v1/kv/${key}`, { method: 'DELETE', signal: AbortSignal.timeout(5000) });
  assert.equal(res.status, 200);
}

test('keys: NAME under the prefix is a service; nested keys and names no service can have are refused', () => {
  assert.deepEqual(serviceOfKey('loopmesh/traffic/web', 'loopmesh/traffic'), { ok: true, service: 'web' });
  assert.deepEqual(serviceOfKey('loopmesh/traffic/API_v2', 'loopmesh/traffic'), { ok: true, service: 'API_v2' });
  assert.equal(serviceOfKey('loopmesh/traffic/', 'loopmesh/traffic'), undefined, 'the folder key is nothing');
  assert.match((serviceOfKey('loopmesh/traffic/web/split', 'loopmesh/traffic') as { reason: string }).reason, /is nested; expected loopmesh\/traffic\/NAME/);
  assert.match((serviceOfKey('loopmesh/traffic/we b', 'loopmesh/traffic') as { reason: string }).reason, /names "we b", which cannot be a service loopmesh routes/);
  assert.match((serviceOfKey(`loopmesh/traffic/${'a'.repeat(70)}`, 'loopmesh/traffic') as { reason: string }).reason, /is 70 characters long/);
});

test('entries -> documents: a bad one keeps the previous document of its service only; wrong shapes are refused', () => {
  const previous = new Map([['web', { split: [{ tag: 'canary', weight: 20 }], limits: {}, outlier: {} }]]);
  const { docs, problems } = trafficDocs(
    [
      { key: 'loopmesh/traffic/web', value: '{"split":[{"tag":"canary","weight":"x"}]}' },
      { key: 'loopmesh/traffic/api', value: '' },
      { key: 'loopmesh/traffic/db', value: 'nope' },
      { key: 'loopmesh/traffic/', value: '' },
    ],
    'loopmesh/traffic',
    previous,
  );
  assert.deepEqual([...docs.keys()].sort(), ['api', 'web']);
  assert.equal(docs.get('web'), previous.get('web'));
  assert.deepEqual(docs.get('api'), { split: [], limits: {}, outlier: {} });
  assert.deepEqual(problems.map((p) => [p.service, p.code]), [['db', codes.trafficInvalid], ['web', codes.trafficInvalid]]);
  assert.match(problems[0]?.message ?? '', /^Consul KV loopmesh\/traffic\/db: expected a JSON object .*got "nope".*; no document in force for this service$/);
  assert.match(problems[1]?.message ?? '', /weight: expected an integer from 0 to 100, got "x"; the previous document stays in force$/);
  assert.deepEqual(parseKvList(undefined, 'kv'), []);
  assert.deepEqual(parseKvList([{ Key: 'a', Value: null }], 'kv'), [{ key: 'a', value: '' }]);
  assert.throws(() => parseKvList({ Key: 'a' }, 'kv'), /kv: expected an array of KV entries, got an object/);
  assert.throws(() => parseKvList([{ Key: 'a', Value: 5 }], 'kv'), /kv\[0\] \(a\): expected a string Value, got number 5/);
});

describe('TrafficWatcher against a real Consul', { timeout: 60_000 }, () => {
  let consul: TestConsul;
  let client: ConsulClient;
  let watcher: TrafficWatcher;
  let changes = 0;

  before(async () => {
    consul = await TestConsul.start();
    client = new ConsulClient({ url: consul.url });
    watcher = new TrafficWatcher({ client, logger: silentLogger(), prefix: 'loopmesh/traffic', waitMs: 10_000, backoffBaseMs: 50, onChange: () => (changes += 1) });
    watcher.start();
  });

  after(async () => {
    await watcher?.stop();
    client?.close();
    await consul?.close();
  });

  test('no key under the prefix (404): settled, no documents, no problem', async () => {
    await eventually(() => watcher.settled(), 5000, 'the first answer');
    assert.equal(changes, 1, 'the first answer asks for a plan even with nothing in it');
    assert.equal(watcher.docs().size, 0);
    assert.deepEqual(watcher.problems(), []);
  });

  test('a document is read at once; an unrelated key under a longer prefix is not ours', async () => {
    const before = changes;
    const started = Date.now();
    await kvPut(consul, 'loopmesh/traffic/web', '{"split":[{"tag":"canary","weight":20}],"limits":{"connectTimeout":0.5}}');
    await kvPut(consul, 'loopmesh/trafficker', 'not json');
    await eventually(() => watcher.docs().get('web')?.split[0]?.weight === 20, 5000, 'web split 20');
    const ms = Date.now() - started;
    assert.ok(ms < 2000, `seen after ${ms} ms (blocking query returns at once on change)`);
    assert.deepEqual(watcher.docs().get('web'), { split: [{ tag: 'canary', weight: 20 }], limits: { connectTimeoutMs: 500 }, outlier: {} });
    assert.ok(changes > before);
    assert.deepEqual(watcher.problems(), []);
    // The one-shot read (for `loopmesh render`) sees the same.
    assert.deepEqual([...(await readTrafficDocs(client, 'loopmesh/traffic')).docs], [...watcher.docs()]);
  });

  test('a bad document: reported with the key and the value, the previous one stays; no previous: no document', async () => {
    await kvPut(consul, 'loopmesh/traffic/web', '{"split":[{"tag":"canary","weight":150}]}');
    await kvPut(consul, 'loopmesh/traffic/api', '{"splt":[]}');
    await eventually(() => watcher.problems().length === 2, 5000, 'two problems');
    const [api, web] = watcher.problems();
    assert.equal(web?.code, codes.trafficInvalid);
    assert.equal(web?.service, 'web');
    assert.match(web?.message ?? '', /^Consul KV loopmesh\/traffic\/web: split\[0\]\.weight: expected an integer from 0 to 100, got number 150; the previous document stays in force$/);
    assert.equal(api?.service, 'api');
    assert.match(api?.message ?? '', /loopmesh\/traffic\/api: unknown key "splt".*; no document in force for this service$/);
    assert.equal(watcher.docs().get('web')?.split[0]?.weight, 20, 'the previous split stays');
    assert.equal(watcher.docs().has('api'), false);
  });

  test('fixed: the new document and no problem; nested and unroutable keys are reported and ignored', async () => {
    await kvPut(consul, 'loopmesh/traffic/web', '{"split":[{"tag":"canary","weight":100}]}');
    await kvDelete(consul, 'loopmesh/traffic/api');
    await kvPut(consul, 'loopmesh/traffic/db/split', '{}');
    await kvPut(consul, 'loopmesh/traffic/bad%20name', '{}');
    await eventually(() => watcher.docs().get('web')?.split[0]?.weight === 100 && watcher.problems().length === 2, 5000, 'web 100, two key problems');
    const messages = watcher.problems().map((p) => p.message);
    assert.ok(messages.some((m) => /key "loopmesh\/traffic\/db\/split" is nested; .*ignored$/.test(m)), messages.join('\n'));
    assert.ok(messages.some((m) => /key "loopmesh\/traffic\/bad name" names "bad name", which cannot be a service.*ignored$/.test(m)), messages.join('\n'));
    assert.deepEqual([...watcher.docs().keys()], ['web']);
    await kvDelete(consul, 'loopmesh/traffic/db/split');
    await kvDelete(consul, 'loopmesh/traffic/bad%20name');
    await eventually(() => watcher.problems().length === 0, 5000, 'no problem');
  });

  test('an unchanged document written again does not ask for a plan', async () => {
    const before = changes;
    await kvPut(consul, 'loopmesh/traffic/web', '{"split":[{"tag":"canary","weight":100}]}');
    await kvPut(consul, 'loopmesh/traffic/web', '{ "split": [ {"weight":100, "tag":"canary"} ] }');
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(changes, before);
  });

  test('Consul down: the documents stay (fail static) and the read failure is a problem; back: read again', async () => {
    await consul.stop();
    await eventually(() => watcher.problems().some((p) => p.code === codes.consulUnreachable), 10_000, 'the read failure reported');
    assert.match(watcher.problems()[0]?.message ?? '', /cannot read the traffic documents under loopmesh\/traffic\/: .*; the last ones read stay in force/);
    assert.equal(watcher.docs().get('web')?.split[0]?.weight, 100, 'kept while Consul is down');
    // A new, empty dev Consul on the same port: the key is gone, so is the document.
    await consul.restart();
    await eventually(() => watcher.docs().size === 0 && watcher.problems().length === 0, 15_000, 'read again after Consul came back');
  });

  test('a deleted key: no document', async () => {
    await kvPut(consul, 'loopmesh/traffic/web', '{"policy":"round-robin"}');
    await eventually(() => watcher.docs().get('web')?.policy === 'round-robin', 5000, 'web doc');
    await kvDelete(consul, 'loopmesh/traffic/web');
    await eventually(() => watcher.docs().size === 0, 5000, 'no doc');
  });
});
