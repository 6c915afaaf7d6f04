import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseCatalogServices, parseHealthService, parseHealthState, selectServices, servicesAffectedByChecks } from '../../../agent/consul/catalog.js';

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

test('parseHealthService rejects bad entries one by one, naming them', () => {
  const body = [entry('ok', 'n1', ['passing']), entry('badport', 'n1', ['passing'], { Port: 0 }), entry('strport', 'n1', ['passing'], { Port: '80' }), 'garbage', { Node: {}, Service: {} }];
  const r = parseHealthService('web', body, { allowWarning: false });
  assert.deepEqual(r.instances.map((i) => i.id), ['n1/ok']);
  assert.equal(r.problems.length, 4);
  assert.match(r.problems[0]?.message ?? '', /badport on n1.*port from 1 to 65535, got number 0/);
  assert.match(r.problems[1]?.message ?? '', /got "80"/);
  assert.match(parseHealthService('web', { not: 'an array' }, { allowWarning: false }).problems[0]?.message ?? '', /expected an array/);
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
