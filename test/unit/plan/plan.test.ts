import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dnsLabel } from '../../../agent/plan/names.js';
import { choosePort } from '../../../agent/plan/ports.js';
import { allocate, parseRange, reservedAddresses } from '../../../agent/plan/addresses.js';
import { plan, planLabels, PlanMemo } from '../../../agent/plan/plan.js';
import type { Instance } from '../../../agent/consul/catalog.js';

function instance(id: string, port: number, meta: Record<string, string> = {}): Instance {
  return { id: `n1/${id}`, node: 'n1', address: '10.0.0.1', port, datacenter: 'dc1', tags: [], meta, status: 'passing', weight: 1 };
}

test('dnsLabel turns service names into RFC 1123 labels or refuses them', () => {
  const cases: [string, string | null][] = [
    ['web', 'web'],
    ['Web', 'web'],
    ['user_api', 'user-api'],
    ['redis-6', 'redis-6'],
    ['a'.repeat(63), 'a'.repeat(63)],
    ['a'.repeat(64), null],
    ['-web', null],
    ['web-', null],
    ['web.v2', null],
    ['wéb', null],
    ['', null],
    ['has space', null],
  ];
  for (const [input, expected] of cases) {
    const r = dnsLabel(input);
    assert.equal(r.ok ? r.label : null, expected, `dnsLabel(${JSON.stringify(input)})`);
  }
});

test('choosePort: meta loopmesh-port wins, else the most common port, ties to the lowest', () => {
  const cases: [string, Instance[], number | undefined, number | string][] = [
    ['meta', [instance('a', 8080, { 'loopmesh-port': '80' }), instance('b', 8081)], undefined, 80],
    ['most common', [instance('a', 9000), instance('b', 9001), instance('c', 9001)], undefined, 9001],
    ['tie to lowest', [instance('a', 9002), instance('b', 9001)], undefined, 9001],
    ['bad meta ignored', [instance('a', 7000, { 'loopmesh-port': 'http' })], undefined, 7000],
    ['no instances keeps previous', [], 6379, 6379],
    ['no instances, nothing known', [], undefined, 'no healthy instance'],
    ['meta out of range and nothing else', [], undefined, 'no healthy instance'],
  ];
  for (const [name, instances, previous, expected] of cases) {
    const r = choosePort(instances, previous);
    if (typeof expected === 'number') assert.deepEqual(r.ok && r.port, expected, name);
    else assert.ok(!r.ok && r.reason.includes(expected), `${name}: ${JSON.stringify(r)}`);
  }
});

test('parseRange accepts CIDRs inside 127/8 and names the bad value otherwise', () => {
  const r = parseRange('127.77.0.0/16');
  assert.equal(r.first, (127 << 24 >>> 0) + (77 << 16) + 1);
  assert.equal(r.last, (127 << 24 >>> 0) + (77 << 16) + 65534);
  for (const bad of ['10.0.0.0/8', '127.0.0.0/33', '127.0.0.0', 'nonsense', '127.0.0.0/31']) {
    assert.throws(() => parseRange(bad), (err: Error) => err.message.includes(`"${bad}"`), bad);
  }
});

test('allocate gives the lowest free address, skips reserved ones, is deterministic and reports exhaustion', () => {
  const range = parseRange('127.0.0.0/29'); // .1 to .6; .1 is reserved
  const first = allocate({}, ['b', 'a'], range);
  assert.deepEqual(first.table, { a: '127.0.0.2', b: '127.0.0.3' });
  assert.ok(!Object.values(first.table).some((a) => reservedAddresses.includes(a)));
  const again = allocate(first.table, ['c', 'a'], range);
  assert.equal(again.table.a, '127.0.0.2', 'existing addresses never move');
  assert.equal(again.table.c, '127.0.0.4');
  const full = allocate(again.table, ['d', 'e', 'f', 'g'], range);
  assert.deepEqual(full.exhausted, ['f', 'g']);
  assert.deepEqual(allocate({}, ['x', 'y'], range).table, allocate({}, ['y', 'x'], range).table, 'order of names does not matter');
});

test('planLabels skips invalid names and collisions without touching other services', () => {
  const { labels, problems } = planLabels(['web', 'Web', 'WEB_', 'api', 'API_v2', 'api-v2', 'bad.name', 'x_y', 'X_Y']);
  assert.equal(labels.get('web'), 'web');
  assert.equal(labels.get('api'), 'api');
  assert.equal(labels.get('api-v2'), 'api-v2', 'the exact name keeps its label');
  assert.equal(labels.has('API_v2'), false);
  assert.equal(labels.has('Web'), false);
  assert.equal(labels.has('x_y') || labels.has('X_Y'), false, 'no exact owner: both skipped');
  const codesBy = Object.fromEntries(problems.map((p) => [p.service, p.code]));
  assert.equal(codesBy['bad.name'], 'LM_ERR_PLAN_INVALID_NAME');
  assert.equal(codesBy['Web'], 'LM_ERR_PLAN_NAME_COLLISION');
  assert.match(problems.find((p) => p.service === 'WEB_')?.message ?? '', /WEB_/);
});

test('plan builds routes from catalog and addresses; a service without address or port is skipped alone', () => {
  const catalog = new Map<string, Instance[]>([
    ['web', [instance('w1', 8080, { 'loopmesh-port': '80' }), instance('w2', 8081, { 'loopmesh-port': '80' })]],
    ['redis', [instance('r1', 6379)]],
    ['noaddr', [instance('n1', 1234)]],
    ['empty', []],
    ['bad.name', [instance('b1', 1)]],
  ]);
  const { routes, problems } = plan(catalog, { web: '127.77.0.2', redis: '127.77.0.3', empty: '127.77.0.4' }, [], { suffix: 'local', empty: 'reject' });
  assert.deepEqual(routes.map((r) => [r.fqdn, r.address, r.port, r.backends.length]), [['redis.local', '127.77.0.3', 6379, 1], ['web.local', '127.77.0.2', 80, 2]]);
  assert.deepEqual(routes.find((r) => r.name === 'web')?.backends.map((b) => `${b.address}:${b.port}`), ['10.0.0.1:8080', '10.0.0.1:8081']);
  assert.deepEqual(problems.map((p) => [p.service, p.code]).sort(), [['bad.name', 'LM_ERR_PLAN_INVALID_NAME'], ['empty', 'LM_ERR_PLAN_NO_PORT'], ['noaddr', 'LM_ERR_PLAN_NO_ADDRESS']]);
  const later = plan(new Map([['empty', []]]), { empty: '127.77.0.4' }, [{ ...routes[0]!, service: 'empty', name: 'empty', port: 5432 }], { suffix: 'local', empty: 'reject' });
  assert.equal(later.routes[0]?.port, 5432, 'a service that lost all instances keeps its port');
  assert.deepEqual(later.routes[0]?.backends, []);
});

test('plan: a backend inside loopmesh\'s range or on one of its listeners is refused, the others kept', () => {
  const range = parseRange('127.77.0.0/16');
  const catalog = new Map([
    ['web', [{ ...instance('a', 80), address: '127.77.0.1' }, { ...instance('b', 80), address: '10.0.0.2' }]],
    ['api', [{ ...instance('c', 9000), address: 'web.example' }]],
  ]);
  const { routes, problems } = plan(catalog, { web: '127.77.0.1', api: '127.77.0.2' }, [], { suffix: 'local', empty: 'reject', range });
  const web = routes.find((r) => r.service === 'web');
  assert.deepEqual(web?.backends.map((b) => b.address), ['10.0.0.2']);
  assert.equal(routes.find((r) => r.service === 'api')?.backends.length, 1);
  assert.deepEqual(problems.map((p) => [p.service, p.code]), [['web', 'LM_ERR_PLAN_SELF_BACKEND']]);
});

test('plan: two services on one address never both reach balancer.json; the others are planned', () => {
  const catalog = new Map([
    ['a', [instance('a', 80)]],
    ['b', [instance('b', 80)]],
    ['c', [instance('c', 80)]],
  ]);
  const { routes, problems } = plan(catalog, { a: '127.77.0.1', b: '127.77.0.1', c: '127.77.0.3' }, [], { suffix: 'local', empty: 'reject' });
  assert.deepEqual(routes.map((r) => r.service), ['a', 'c']);
  assert.deepEqual(problems.map((p) => [p.service, p.code]), [['b', 'LM_ERR_PLAN_ADDRESS_CONFLICT']]);
});

test('plan: an instance address or id that is not fit for a rendered file never reaches a route', () => {
  const catalog = new Map([
    ['web', [
      { ...instance('evil', 80), address: '10.0.0.9\nserver evil 6.6.6.6:80' },
      { ...instance('bad\nid', 80), address: '10.0.0.3' },
      { ...instance('good', 80), address: '10.0.0.2' },
    ]],
  ]);
  const { routes, problems } = plan(catalog, { web: '127.77.0.1' }, [], { suffix: 'local', empty: 'reject' });
  assert.deepEqual(routes[0]?.backends.map((b) => b.address), ['10.0.0.2']);
  assert.equal(problems.filter((p) => p.code === 'LM_ERR_CONSUL_INVALID_INSTANCE').length, 2);
  assert.match(problems[0]?.message ?? '', /\\n/, 'the newline is shown escaped');
});

test('policy: the KV document beats meta loopmesh-lb (most common valid value), which beats the flag; an unknown meta value is reported', () => {
  const range = parseRange('127.77.0.0/16');
  const catalog = new Map([
    ['web', [instance('w1', 80, { 'loopmesh-lb': 'least-conn' }), instance('w2', 80, { 'loopmesh-lb': 'least-conn' }), instance('w3', 80, { 'loopmesh-lb': 'round-robin' })]],
    ['api', [instance('a1', 80, { 'loopmesh-lb': 'fastest' })]],
    ['db', [instance('d1', 5432)]],
  ]);
  const addresses = { web: '127.77.0.2', api: '127.77.0.3', db: '127.77.0.4' };
  const first = plan(catalog, addresses, [], { suffix: 'local', empty: 'reject', range, policy: 'round-robin' });
  const policy = (routes: typeof first.routes, s: string) => routes.find((r) => r.service === s)?.policy;
  assert.deepEqual([policy(first.routes, 'web'), policy(first.routes, 'api'), policy(first.routes, 'db')], ['least-conn', 'round-robin', 'round-robin']);
  assert.ok(first.problems.some((p) => p.code === 'LM_ERR_PLAN_INVALID_POLICY' && p.message.includes('"fastest"')), JSON.stringify(first.problems));
  const withDoc = plan(catalog, addresses, [], { suffix: 'local', empty: 'reject', range, traffic: new Map([['web', { split: [], policy: 'p2c-ewma', limits: {}, outlier: {} }]]) });
  assert.equal(policy(withDoc.routes, 'web'), 'p2c-ewma');
  assert.equal(policy(withDoc.routes, 'db'), 'p2c-ewma', 'the default without a flag');
});

test('split: each instance is in the subset of the first split tag it carries; the rest gets what is left of 100; weights and limits reach the route', () => {
  const tagged = (id: string, tags: string[], weight = 1) => ({ ...instance(id, 80), tags, weight });
  const catalog = new Map([['web', [tagged('old', []), tagged('new', ['canary', 'v2'], 3), tagged('v2only', ['v2'])]]]);
  const traffic = new Map([['web', { split: [{ tag: 'canary', weight: 5 }, { tag: 'v2', weight: 15 }], limits: { maxConnections: 10 }, outlier: { consecutiveFailures: 5 } }]]);
  const { routes } = plan(catalog, { web: '127.77.0.2' }, [], { suffix: 'local', empty: 'reject', traffic });
  const web = routes[0]!;
  assert.deepEqual(web.split, [{ name: 'canary', weight: 5 }, { name: 'v2', weight: 15 }, { name: '', weight: 80 }]);
  assert.deepEqual(web.backends.map((b) => [b.id, b.subset, b.weight]), [['n1/old', '', 1], ['n1/new', 'canary', 3], ['n1/v2only', 'v2', 1]]);
  assert.deepEqual([web.limits, web.outlier], [{ maxConnections: 10 }, { consecutiveFailures: 5 }]);
  const none = plan(catalog, { web: '127.77.0.2' }, [], { suffix: 'local', empty: 'reject' });
  assert.deepEqual([none.routes[0]!.split, none.routes[0]!.backends.every((b) => b.subset === '')], [[], true]);
});

test('plan with a memo: an unchanged service keeps its route object and problems; a changed one is planned again; the result equals a plan without a memo', () => {
  const memo = new PlanMemo();
  const web = [instance('w1', 8080)];
  const redis = [instance('r1', 6379)];
  const odd = [instance('o1', 7000, { 'loopmesh-lb': 'fastest' })];
  const addresses = { web: '127.77.0.2', redis: '127.77.0.3', odd: '127.77.0.4' };
  const options = { suffix: 'local', empty: 'reject' as const, memo };
  // The first plan has no previous routes (no previous ports): the second is the steady state.
  const zero = plan(new Map([['web', web], ['redis', redis], ['odd', odd]]), addresses, [], options);
  const first = plan(new Map([['web', web], ['redis', redis], ['odd', odd]]), addresses, zero.routes, options);
  const again = plan(new Map([['web', web], ['redis', redis], ['odd', odd]]), addresses, first.routes, options);
  for (const r of first.routes) assert.equal(again.routes.find((x) => x.service === r.service), r, `${r.service}: the same object`);
  assert.deepEqual(again.problems, first.problems, 'a kept service\'s problems are said again');
  assert.equal(again.problems[0]?.code, 'LM_ERR_PLAN_INVALID_POLICY');

  // web's instances change (a new array from the watcher): only web is planned again.
  const web2 = [instance('w1', 8080), instance('w2', 8080)];
  const changed = plan(new Map([['web', web2], ['redis', redis], ['odd', odd]]), addresses, again.routes, options);
  assert.notEqual(changed.routes.find((r) => r.service === 'web'), first.routes.find((r) => r.service === 'web'));
  assert.equal(changed.routes.find((r) => r.service === 'redis'), first.routes.find((r) => r.service === 'redis'));
  const fresh = plan(new Map([['web', web2], ['redis', redis], ['odd', odd]]), addresses, again.routes, { suffix: 'local', empty: 'reject' });
  assert.deepEqual(changed, fresh, 'the same routes and problems as without a memo');

  // Other options (another suffix) make every kept entry stale.
  const other = plan(new Map([['web', web2], ['redis', redis], ['odd', odd]]), addresses, changed.routes, { ...options, suffix: 'internal' });
  assert.deepEqual(other.routes.map((r) => r.fqdn), ['odd.internal', 'redis.internal', 'web.internal']);
});
