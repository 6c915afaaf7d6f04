import { test } from 'node:test';
import assert from 'node:assert/strict';
import { emptyTrafficDoc, parseTrafficDoc, type TrafficDoc } from '../../../agent/contract/traffic.js';

const where = 'Consul KV loopmesh/traffic/web';

test('the full document: seconds become milliseconds, every key lands in its field', () => {
  const text = JSON.stringify({
    split: [
      { tag: 'canary', weight: 20 },
      { tag: 'v2', weight: 5 },
    ],
    policy: 'least-conn',
    limits: { maxConnections: 200, queue: 50, queueTimeout: 5, connectTimeout: 1, idleTimeout: 600, drain: 'drain', drainTimeout: 30 },
    outlier: { consecutiveFailures: 3, baseEjection: 5, maxEjection: 60, maxEjectedPercent: 50, panicThresholdPercent: 50 },
  });
  const expected: TrafficDoc = {
    split: [
      { tag: 'canary', weight: 20 },
      { tag: 'v2', weight: 5 },
    ],
    policy: 'least-conn',
    limits: { maxConnections: 200, queue: 50, queueTimeoutMs: 5000, connectTimeoutMs: 1000, idleTimeoutMs: 600_000, drain: 'drain', drainTimeoutMs: 30_000 },
    outlier: { consecutiveFailures: 3, baseEjectionMs: 5000, maxEjectionMs: 60_000, maxEjectedPercent: 50, panicThresholdPercent: 50 },
  };
  assert.deepEqual(parseTrafficDoc(text, where), expected);
});

test('fractions of a second, 0 where allowed, and only what is set', () => {
  assert.deepEqual(parseTrafficDoc('{"limits":{"connectTimeout":0.25,"drainTimeout":0,"queue":0,"maxConnections":0}}', where), {
    split: [],
    limits: { connectTimeoutMs: 250, drainTimeoutMs: 0, queue: 0, maxConnections: 0 },
    outlier: {},
  });
  assert.deepEqual(parseTrafficDoc('{"outlier":{"baseEjection":0.001}}', where).outlier, { baseEjectionMs: 1 });
  assert.deepEqual(parseTrafficDoc('{"split":[{"tag":"canary","weight":100}]}', where).split, [{ tag: 'canary', weight: 100 }]);
  assert.deepEqual(parseTrafficDoc('{"split":[{"tag":"canary","weight":0}]}', where).split, [{ tag: 'canary', weight: 0 }]);
  assert.equal(parseTrafficDoc('{"split":[]}', where).policy, undefined);
});

test('empty text, whitespace and {} are the empty document', () => {
  for (const text of ['', '   \n\t', '{}', ' {} \n']) assert.deepEqual(parseTrafficDoc(text, where), emptyTrafficDoc, JSON.stringify(text));
});

test('each kind of bad value: a TypeError naming where, the value, and what was expected', async (t) => {
  const cases: Array<{ what: string; doc: string; says: RegExp }> = [
    { what: 'broken JSON', doc: '{"split":[{"tag":"canary","weight":20}', says: /^Consul KV loopmesh\/traffic\/web: expected a JSON object .*got "\{\\"split\\".*not valid JSON/ },
    { what: 'not an object', doc: '[1,2]', says: /^Consul KV loopmesh\/traffic\/web: expected an object, got an array$/ },
    { what: 'null', doc: 'null', says: /expected an object, got null/ },
    { what: 'a typo at the top ("splt")', doc: '{"splt":[{"tag":"canary","weight":20}]}', says: /web: unknown key "splt"; expected only split, policy, limits, outlier/ },
    { what: 'a typo in limits', doc: '{"limits":{"connectTimeoutMs":1000}}', says: /limits: unknown key "connectTimeoutMs"; expected only maxConnections, queue, queueTimeout, connectTimeout, idleTimeout, drain, drainTimeout/ },
    { what: 'a typo in outlier', doc: '{"outlier":{"consecutiveFailure":3}}', says: /outlier: unknown key "consecutiveFailure"/ },
    { what: 'a typo in a split part', doc: '{"split":[{"tag":"canary","wieght":20}]}', says: /split\[0\]: unknown key "wieght"; expected only tag, weight/ },
    { what: 'split not an array', doc: '{"split":{"canary":20}}', says: /split: expected an array, got an object/ },
    { what: 'weight over 100', doc: '{"split":[{"tag":"canary","weight":150}]}', says: /split\[0\]\.weight: expected an integer from 0 to 100, got number 150/ },
    { what: 'negative weight', doc: '{"split":[{"tag":"canary","weight":-5}]}', says: /split\[0\]\.weight: expected an integer from 0 to 100, got number -5/ },
    { what: 'fractional weight', doc: '{"split":[{"tag":"canary","weight":2.5}]}', says: /weight: expected an integer from 0 to 100, got number 2\.5/ },
    { what: 'weight as a string', doc: '{"split":[{"tag":"canary","weight":"20"}]}', says: /weight: expected an integer from 0 to 100, got "20"/ },
    { what: 'no weight', doc: '{"split":[{"tag":"canary"}]}', says: /split\[0\]\.weight: expected an integer from 0 to 100, got nothing/ },
    { what: 'empty tag', doc: '{"split":[{"tag":"","weight":5}]}', says: /split\[0\]\.tag: expected a Consul tag \(1 to 255 characters, no control characters\), got ""/ },
    { what: 'tag with a newline', doc: '{"split":[{"tag":"can\\nary","weight":5}]}', says: /split\[0\]\.tag: expected a Consul tag .*got "can\\nary"/ },
    { what: 'tag too long', doc: JSON.stringify({ split: [{ tag: 'x'.repeat(256), weight: 5 }] }), says: /split\[0\]\.tag: expected a Consul tag \(1 to 255 characters/ },
    { what: 'tag not a string', doc: '{"split":[{"tag":7,"weight":5}]}', says: /split\[0\]\.tag: expected a string, got number 7/ },
    { what: 'a tag twice', doc: '{"split":[{"tag":"canary","weight":5},{"tag":"canary","weight":10}]}', says: /split: the tag "canary" is there twice; expected each tag once/ },
    { what: 'weights over 100 in sum', doc: '{"split":[{"tag":"canary","weight":60},{"tag":"v2","weight":50}]}', says: /split: the weights add up to 110 \(canary 60 \+ v2 50\); expected at most 100/ },
    { what: 'unknown policy', doc: '{"policy":"random"}', says: /policy: expected one of p2c-ewma, least-conn, round-robin, got "random"/ },
    { what: 'unknown drain', doc: '{"limits":{"drain":"wait"}}', says: /limits\.drain: expected one of keep, drain, reset, got "wait"/ },
    { what: 'a timeout of 0', doc: '{"limits":{"connectTimeout":0}}', says: /limits\.connectTimeout: expected a number of seconds from 0\.001 to 86400 .*got number 0/ },
    { what: 'a timeout over a day (ms typed as s)', doc: '{"limits":{"idleTimeout":600000}}', says: /limits\.idleTimeout: expected a number of seconds from 0\.001 to 86400.*got number 600000/ },
    { what: 'a timeout as a string', doc: '{"limits":{"queueTimeout":"5s"}}', says: /limits\.queueTimeout: expected a number of seconds .*got "5s"/ },
    { what: 'a negative drain timeout', doc: '{"limits":{"drainTimeout":-1}}', says: /limits\.drainTimeout: expected a number of seconds from 0 to 86400, got number -1/ },
    { what: 'maxConnections fractional', doc: '{"limits":{"maxConnections":1.5}}', says: /limits\.maxConnections: expected an integer from 0 to 1000000, got number 1\.5/ },
    { what: 'queue too large', doc: '{"limits":{"queue":2000000}}', says: /limits\.queue: expected an integer from 0 to 1000000, got number 2000000/ },
    { what: 'consecutiveFailures 0', doc: '{"outlier":{"consecutiveFailures":0}}', says: /outlier\.consecutiveFailures: expected an integer from 1 to 1000, got number 0/ },
    { what: 'a percent over 100', doc: '{"outlier":{"maxEjectedPercent":101}}', says: /outlier\.maxEjectedPercent: expected an integer from 0 to 100, got number 101/ },
    { what: 'panic threshold negative', doc: '{"outlier":{"panicThresholdPercent":-1}}', says: /outlier\.panicThresholdPercent: expected an integer from 0 to 100, got number -1/ },
    { what: 'maxEjection below baseEjection', doc: '{"outlier":{"baseEjection":30,"maxEjection":10}}', says: /outlier\.maxEjection: expected at least baseEjection \(30 s\), got number 10/ },
    { what: 'limits not an object', doc: '{"limits":5}', says: /limits: expected an object, got number 5/ },
  ];
  for (const c of cases) {
    await t.test(c.what, () => {
      assert.throws(
        () => parseTrafficDoc(c.doc, where),
        (err: unknown) => {
          assert.ok(err instanceof TypeError, `a TypeError, got ${String(err)}`);
          assert.ok(err.message.startsWith(where), `names where: ${err.message}`);
          assert.match(err.message, c.says);
          return true;
        },
      );
    });
  }
});

test('a split of more than 32 tags is refused: every new connection looks at each subset', async () => {
  const { parseTrafficDoc, maxSplitParts } = await import('../../../agent/contract/traffic.js');
  const doc = (n: number): string => JSON.stringify({ split: Array.from({ length: n }, (_, i) => ({ tag: `t${i}`, weight: 0 })) });
  assert.equal(parseTrafficDoc(doc(maxSplitParts), 'kv').split.length, maxSplitParts);
  assert.throws(() => parseTrafficDoc(doc(5000), 'kv'), /split: 5000 entries; expected at most 32 tags/);
});
