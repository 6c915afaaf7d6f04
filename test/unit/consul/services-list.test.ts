import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseServicesList } from '../../../agent/consul/services-list.js';

test('a KV list of services: JSON array or names by commas and lines; a bad entry is skipped by name; an unparsable value throws naming the key', () => {
  assert.deepEqual(parseServicesList('k', '["web","db","web"]'), { services: ['db', 'web'], problems: [] });
  assert.deepEqual(parseServicesList('k', 'web, db\n# a comment\n\napi\n').services, ['api', 'db', 'web']);
  const mixed = parseServicesList('k', '["web", 7, "bad name", "-dash", ""]');
  assert.deepEqual(mixed.services, ['web']);
  assert.equal(mixed.problems.length, 4);
  assert.match(mixed.problems[1]?.message ?? '', /Consul KV k: entry "bad name" is not a service name/);
  assert.equal(mixed.problems[0]?.code, 'LM_ERR_CONSUL_INVALID_DATA');
  assert.deepEqual(parseServicesList('k', '').services, []);
  assert.throws(() => parseServicesList('loopmesh/x', '["web",'), (err: Error & { code?: string }) => /Consul KV loopmesh\/x: .*expected a JSON array of service names/.test(err.message) && err.code === 'LM_ERR_CONSUL_INVALID_DATA');
  // An object is not a list: one entry that is no name, named in the problem.
  const object = parseServicesList('k', '{"web": true}');
  assert.deepEqual(object.services, []);
  assert.match(object.problems[0]?.message ?? '', /entry "\{\\"web\\": true\}" is not a service name/);
  // A huge list is parsed without trouble (a KV value is at most 512 KB).
  const big = JSON.stringify(Array.from({ length: 20_000 }, (_, i) => `svc${i}`));
  assert.equal(parseServicesList('k', big).services.length, 20_000);
});
