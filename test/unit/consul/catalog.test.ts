import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseCatalogServices, parseHealthService, parseHealthState, selectServices, servicesAffectedByChecks } from '../../../agent/consul/catalog.js';
import { ConsulError, codes } from '../../../agent/errors.js';

const entry = (id: string, node: string, checks: string[], extra: Record<string, unknown> = {}) => ({
  Node: { Node: node, Address: `10.0.0.${node.length}`, Datacenter: 'dc1' },
  Service: { ID: id, Service: 'web', Address: '', Port: 8080, Tags: ['a'], Meta: { 'loopmesh-port': '80', n: 1 }, ...extra },
  Checks: checks.map((Status) => ({ Status })),
});

test('parseHealthService keeps healthy instances only and falls back to the node address', () => {
  const body = [entry('w1', 'n1', ['passing', 'passing']), entry('w2', 'n22', ['passing', 'warning']), entry('w3', 'n333', ['critical']), entry('w4', 'n4', [], { Address: '192.0.2.9' })];
  const strict = parseHealthService('web', body, { allowWarning: false });
  assert.deepEqual(strict.instances.map((i) => [i.id, i.address]), [['n1/w1', '10.0.0.2'], ['n4/w4', '192.0.2.9']]);
  assert.deepEqual(strict.instances[0]?.meta, { 'loopmesh-port': '80' }, 'non-string meta values are dropped');
  const lenient = parseHealthService('web', body, { allowWarning: true });
  assert.deepEqual(lenient.instances.map((i) => `${i.id}:${i.status}`), ['n1/w1:passing', 'n22/w2:warning', 'n4/w4:passing']);
  assert.deepEqual(strict.nodes, ['n1', 'n22', 'n333', 'n4'], 'nodes lists unhealthy instances too (for node-level checks)');
});

test('parseHealthService skips bad instances one by one, naming the service, instance, node, value and what was expected', () => {
  const body = [
    entry('ok', 'n1', ['passing']),
    entry('badport', 'n1', ['passing'], { Port: 0 }),
    entry('strport', 'n1', ['passing'], { Port: '80' }),
    entry('evil', 'n1', ['passing'], { Address: '10.0.0.9\nserver evil 6.6.6.6:80' }),
    entry('bad\nid', 'n1', ['passing']),
    { ...entry('badnode', 'n1', ['passing']), Node: { Node: 'n1\rx', Address: '10.0.0.1' } },
    entry('', 'n1', ['passing']),
  ];
  const r = parseHealthService('web', body, { allowWarning: false });
  assert.deepEqual(r.instances.map((i) => i.id), ['n1/ok'], 'the good instance still routes');
  assert.equal(r.problems.length, 6);
  for (const p of r.problems) {
    assert.equal(p.code, codes.consulInvalidInstance);
    assert.equal(p.service, 'web');
    assert.doesNotMatch(p.message, /[\n\r]/, 'a message is one line, whatever Consul holds');
  }
  const messages = r.problems.map((p) => p.message);
  assert.match(messages[0] ?? '', /^service "web": instance "badport" on node "n1" has the port number 0; expected an integer from 1 to 65535/);
  assert.match(messages[1] ?? '', /the port "80"/);
  assert.match(messages[2] ?? '', /instance "evil" on node "n1" has the address "10\.0\.0\.9\\nserver evil 6\.6\.6\.6:80"; expected an IP address .* or a host name \(RFC 1123/);
  assert.match(messages[3] ?? '', /instance "bad\\nid" on node "n1" has the service ID "bad\\nid"; expected .*without control characters/);
  assert.match(messages[4] ?? '', /on node "n1\\rx" has the node name "n1\\rx"/);
  assert.match(messages[5] ?? '', /has the service ID ""; expected a non-empty ID/);
  assert.deepEqual(r.nodes, ['n1'], 'a node name that is not sane is not followed either');
});

test('instance addresses: IP literals and RFC 1123 host names only', () => {
  const longest = `${'a'.repeat(63)}.${'b'.repeat(63)}.${'c'.repeat(63)}.${'d'.repeat(61)}`;
  const accepted = ['10.0.0.1', '192.0.2.255', '::1', '2001:db8::7', '::ffff:192.0.2.1', 'db', 'db-1.example.com', 'x1.2b', `${'a'.repeat(63)}.com`, longest];
  const rejected = [
    '10.0.0.9\nserver evil 6.6.6.6:80', '10.0.0.1 ', ' db', 'db\tx', 'db;rm', 'db_1', '-db', 'db-', 'a..b', '.db', 'db.', 'a'.repeat(64),
    `${longest}d`, '256.1.1.1', '10.0.0.01', '1.2.3', 'fe80::1%eth0', '[::1]', '10.0.0.1:80', 'db\u2028x', 'ünï.example',
  ];
  assert.equal(longest.length, 253);
  const routes = (Address: string) => parseHealthService('web', [entry('w', 'n1', ['passing'], { Address })], { allowWarning: false }).instances.length === 1;
  assert.deepEqual(accepted.filter((a) => !routes(a)), [], 'every valid address is accepted');
  assert.deepEqual(rejected.filter(routes), [], 'every invalid address is skipped');
  const none = { ...entry('w', 'n1', ['passing']), Node: { Node: 'n1', Address: '' } };
  assert.match(parseHealthService('web', [none], { allowWarning: false }).problems[0]?.message ?? '', /has the address ""/, 'no address at all (Service and Node both empty)');
});

test('a wrong-shaped health answer is refused whole (LM_ERR_CONSUL_INVALID_DATA), naming the service and what was wrong', () => {
  const good = entry('ok', 'n1', ['passing']);
  const cases: Array<[string, unknown, RegExp]> = [
    ['an object', { Node: {}, Service: {} }, /health\/service\/web: expected an array of \{Node, Service, Checks\} entries, got an object/],
    ['null', null, /got null/],
    ['a string (a body that is not JSON)', '[{"Node": {"No', /got "\[\{\\"Node/],
    ['a junk entry', [good, 'garbage'], /entry 1 of 2: expected an object with Node, Service and Checks, got "garbage"/],
    ['an entry without Checks', [good, { Node: { Node: 'n1' }, Service: { ID: 'x' } }], /entry 1 of 2: Checks: expected an array, got nothing/],
    ['Node not an object', [{ ...good, Node: 'n1' }], /entry 0 of 1: Node: expected an object, got "n1"/],
    ['Service.ID a number', [{ ...good, Service: { ...good.Service, ID: 7 } }], /Service\.ID: expected a string, got number 7/],
    ['Node.Node missing', [{ ...good, Node: { Address: '10.0.0.1' } }], /Node\.Node: expected a string, got nothing/],
  ];
  for (const [what, body, message] of cases) {
    assert.throws(
      () => parseHealthService('web', body, { allowWarning: false }),
      (err: unknown) => err instanceof ConsulError && err.code === codes.consulInvalidData && message.test(err.message),
      what,
    );
  }
  assert.equal(parseHealthService('web', [], { allowWarning: false }).instances.length, 0, 'an empty array is a valid answer: no instances');
});

test('catalog services: parse and select (never consul itself; names and tag)', () => {
  const all = parseCatalogServices({ consul: [], web: ['http'], redis: ['db'], api: ['http', 'v2'] });
  assert.deepEqual(selectServices(all, { services: [], tag: undefined }), ['api', 'redis', 'web']);
  assert.deepEqual(selectServices(all, { services: ['web', 'redis', 'nope'], tag: undefined }), ['redis', 'web']);
  assert.deepEqual(selectServices(all, { services: [], tag: 'http' }), ['api', 'web']);
  assert.throws(() => parseCatalogServices(['web']), /expected an object/);
});

test('servicesAffectedByChecks: service checks name their service; node checks reach every service on the node', () => {
  const before = parseHealthState([
    { Node: 'n1', CheckID: 'serfHealth', ServiceName: '', Status: 'passing', ModifyIndex: 5 },
    { Node: 'n1', CheckID: 'c-web', ServiceName: 'web', Status: 'passing', ModifyIndex: 6 },
    { Node: 'n2', CheckID: 'c-db', ServiceName: 'db', Status: 'passing', ModifyIndex: 7 },
  ]);
  const nodes: Record<string, string[]> = { web: ['n1'], db: ['n2'], api: ['n1', 'n2'] };
  const nodesOf = (s: string) => nodes[s] ?? [];
  const known = Object.keys(nodes);
  const webFails = new Map(before);
  webFails.set('n1/c-web', { node: 'n1', service: 'web', status: 'critical', modifyIndex: '9' });
  assert.deepEqual([...servicesAffectedByChecks(before, webFails, nodesOf, known)], ['web']);
  const nodeFails = new Map(before);
  nodeFails.set('n1/serfHealth', { node: 'n1', service: '', status: 'critical', modifyIndex: '10' });
  assert.deepEqual([...servicesAffectedByChecks(before, nodeFails, nodesOf, known)].sort(), ['api', 'web']);
  const dbGone = new Map(before);
  dbGone.delete('n2/c-db');
  assert.deepEqual([...servicesAffectedByChecks(before, dbGone, nodesOf, known)], ['db']);
  assert.equal(servicesAffectedByChecks(before, new Map(before), nodesOf, known).size, 0);
});

test('parseHealthService keeps only instances of exactly this service name (Consul matches "API" for "api")', () => {
  const body = [entry('w1', 'n1', ['passing']), entry('W1', 'n1', ['passing'], { Service: 'WEB' })];
  assert.deepEqual(parseHealthService('web', body, { allowWarning: false }).instances.map((i) => i.id), ['n1/w1']);
  assert.deepEqual(parseHealthService('WEB', body, { allowWarning: false }).instances.map((i) => i.id), ['n1/W1']);
});

test("instance weights: Weights.Passing, or Weights.Warning for a warning instance; anything else counts as Consul's default 1", () => {
  const body = [
    entry('big', 'n1', ['passing'], { Weights: { Passing: 9, Warning: 1 } }),
    entry('warn', 'n2', ['warning'], { Weights: { Passing: 9, Warning: 2 } }),
    entry('none', 'n3', ['passing']),
    entry('odd', 'n4', ['passing'], { Weights: { Passing: -3 } }),
    entry('huge', 'n5', ['passing'], { Weights: { Passing: 1e9 } }),
    entry('text', 'n6', ['passing'], { Weights: { Passing: '5' } }),
  ];
  const { instances } = parseHealthService('web', body, { allowWarning: true });
  assert.deepEqual(Object.fromEntries(instances.map((i) => [i.id.split('/')[1], i.weight])), { big: 9, warn: 2, none: 1, odd: 1, huge: 1, text: 1 });
});
