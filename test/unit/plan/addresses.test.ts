import { test } from 'node:test';
import assert from 'node:assert/strict';
import { classifyAddress, parseRange, reconcileAddresses, type ReconcileInput } from '../../../agent/plan/addresses.js';
import { codes } from '../../../agent/errors.js';

const range = parseRange('127.77.0.0/16');

test('classifyAddress: usable, another range, or invalid anywhere', () => {
  const cases: [unknown, string][] = [
    ['127.77.0.1', 'ok'],
    ['127.88.0.1', 'foreign'],
    ['0.0.0.0', 'invalid'],
    ['10.0.0.5', 'invalid'],
    ['127.0.0.1', 'invalid'],
    ['127.0.0.53', 'invalid'],
    ['127.0.0.0', 'invalid'],
    ['127.255.255.255', 'invalid'],
    ['127.77.0.1\nevil', 'invalid'],
    ['', 'invalid'],
    [42, 'invalid'],
    [null, 'invalid'],
  ];
  for (const [address, kind] of cases) assert.equal(classifyAddress(range, address).kind, kind, JSON.stringify(address));
});

interface Case {
  name: string;
  input: Omit<ReconcileInput, 'range'>;
  table: Record<string, string>;
  document?: Record<string, string>;
  changed: boolean;
  codes: string[];
}

const cases: Case[] = [
  { name: 'in sync: nothing to write', input: { remote: { web: '127.77.0.1' }, local: { web: '127.77.0.1' }, wanted: ['web'] }, table: { web: '127.77.0.1' }, changed: false, codes: [] },
  { name: 'a new service gets the lowest free address', input: { remote: { web: '127.77.0.1' }, local: {}, wanted: ['web', 'api'] }, table: { web: '127.77.0.1', api: '127.77.0.2' }, changed: true, codes: [] },
  {
    name: 'KV lost: the node restores what it served, and a new service gets no address in use',
    input: { remote: {}, local: { web: '127.77.0.1', api: '127.77.0.2' }, wanted: ['web', 'api', 'db'] },
    table: { web: '127.77.0.1', api: '127.77.0.2', db: '127.77.0.3' },
    changed: true,
    codes: [],
  },
  {
    name: 'KV rolled back and the address given away meanwhile: KV wins, the local one moves, reported',
    input: { remote: { web: '127.77.0.1', db: '127.77.0.2' }, local: { web: '127.77.0.1', api: '127.77.0.2' }, wanted: ['web', 'api', 'db'] },
    table: { web: '127.77.0.1', db: '127.77.0.2', api: '127.77.0.3' },
    changed: true,
    codes: [codes.planAddressConflict],
  },
  {
    name: 'a duplicate in KV: the first name keeps it, the other is allocated anew',
    input: { remote: { api: '127.77.0.1', web: '127.77.0.1' }, local: {}, wanted: ['api', 'web'] },
    table: { api: '127.77.0.1', web: '127.77.0.2' },
    changed: true,
    codes: [codes.planAddressConflict],
  },
  {
    name: '0.0.0.0 and an off-host address in KV are replaced, never served',
    input: { remote: { web: '0.0.0.0', api: '10.1.2.3' }, local: {}, wanted: ['web', 'api'] },
    table: { api: '127.77.0.1', web: '127.77.0.2' },
    changed: true,
    codes: [codes.planAddressInvalid, codes.planAddressInvalid],
  },
  {
    name: 'a bad KV entry is repaired with the address this node serves',
    input: { remote: { web: '0.0.0.0', api: '127.77.0.1' }, local: { web: '127.77.0.5', api: '127.77.0.1' }, wanted: ['web', 'api'] },
    table: { api: '127.77.0.1', web: '127.77.0.5' },
    changed: true,
    codes: [codes.planAddressInvalid],
  },
  {
    name: 'a bad local cache entry is dropped, KV untouched when it is right',
    input: { remote: { web: '127.77.0.1' }, local: { web: '127.77.0.1', evil: '0.0.0.0' }, wanted: ['web'] },
    table: { web: '127.77.0.1' },
    changed: false,
    codes: [codes.planAddressInvalid],
  },
  {
    name: "another node's range is left alone in KV and not served here",
    input: { remote: { web: '127.88.0.1', api: '127.77.0.1' }, local: {}, wanted: ['web', 'api'] },
    table: { api: '127.77.0.1' },
    document: { web: '127.88.0.1', api: '127.77.0.1' },
    changed: false,
    codes: [codes.planAddressInvalid],
  },
  {
    name: 'the reserved addresses are never handed out',
    input: { remote: {}, local: {}, wanted: ['a'] },
    table: { a: '127.77.0.1' },
    changed: true,
    codes: [],
  },
];

for (const c of cases) {
  test(`reconcileAddresses: ${c.name}`, () => {
    const r = reconcileAddresses({ ...c.input, range });
    assert.deepEqual(r.table, c.table);
    assert.deepEqual(r.document, c.document ?? c.table);
    assert.equal(r.changed, c.changed);
    assert.deepEqual(r.problems.map((p) => p.code).sort(), [...c.codes].sort());
    const addresses = Object.values(r.table);
    assert.equal(new Set(addresses).size, addresses.length, 'no address twice');
  });
}

test('reconcileAddresses: a full range is reported by name, the others still get theirs', () => {
  const tiny = parseRange('127.99.0.0/30'); // 127.99.0.1 and .2
  const r = reconcileAddresses({ remote: {}, local: {}, wanted: ['a', 'b', 'c'], range: tiny });
  assert.deepEqual(r.table, { a: '127.99.0.1', b: '127.99.0.2' });
  assert.deepEqual(r.exhausted, ['c']);
  assert.equal(r.problems[0]?.code, codes.planAddressesExhausted);
  assert.match(r.problems[0]?.message ?? '', /"c".*127\.99\.0\.0\/30/);
});

test('reconcileAddresses: two nodes with different caches converge on one table without duplicates', () => {
  // Node A restores first (KV lost); node B then reconciles against what A wrote.
  const a = reconcileAddresses({ remote: {}, local: { web: '127.77.0.1', api: '127.77.0.2' }, wanted: ['web', 'api'], range });
  const b = reconcileAddresses({ remote: a.document, local: { web: '127.77.0.1', db: '127.77.0.2' }, wanted: ['web', 'db'], range });
  assert.deepEqual(b.table, { web: '127.77.0.1', api: '127.77.0.2', db: '127.77.0.3' });
  const again = reconcileAddresses({ remote: b.document, local: b.table, wanted: ['web', 'db', 'api'], range });
  assert.equal(again.changed, false);
});

test('reconcileAddresses and plan: services named like Object.prototype members get addresses and routes of their own', async () => {
  const { plan } = await import('../../../agent/plan/plan.js');
  const r = reconcileAddresses({ remote: { web: '127.77.0.1' }, local: {}, wanted: ['constructor', 'tostring', 'hasownproperty', 'web'], range });
  assert.deepEqual(Object.keys(r.table).sort(), ['constructor', 'hasownproperty', 'tostring', 'web']);
  assert.equal(new Set(Object.values(r.table)).size, 4);
  const instance = { id: 'n/a', node: 'n', address: '10.0.0.1', port: 80, datacenter: '', tags: [], meta: {}, status: 'passing' as const, weight: 1 };
  const planned = plan(new Map([['constructor', [instance]], ['web', [instance]]]), r.table, [], { suffix: 'local', empty: 'reject' });
  assert.equal(planned.routes.find((x) => x.service === 'constructor')?.address, r.table.constructor);
  // Without an address the route is left out, never given Object.prototype's function as one.
  const none = plan(new Map([['constructor', [instance]]]), {}, [], { suffix: 'local', empty: 'reject' });
  assert.deepEqual(none.routes, []);
  assert.equal(none.problems[0]?.code, 'LM_ERR_PLAN_NO_ADDRESS');
});
