import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mirrorAddress, parseGatewayRange, parseRange } from '../../../agent/plan/addresses.js';
import { gatewayBackends, gatewaysOf } from '../../../agent/plan/gateways.js';
import { plan } from '../../../agent/plan/plan.js';
import { parseBalancerConfig } from '../../../agent/contract/balancer-config.js';
import { resolveConfig } from '../../../agent/config/config.js';
import type { Instance } from '../../../agent/consul/catalog.js';

const range = parseRange('127.77.0.0/16');

function gatewayInstance(id: string, meta: Record<string, string>): Instance {
  return { id: `gw/${id}`, node: 'gw', address: '10.77.77.10', port: 9191, datacenter: 'dc1', tags: [], meta, status: 'passing', weight: 1 };
}

function web(id: string, address = '10.77.77.12'): Instance {
  return { id: `n2/${id}`, node: 'n2', address, port: 8080, datacenter: 'dc1', tags: [], meta: { 'loopmesh-port': '80' }, status: 'passing', weight: 1 };
}

test('parseGatewayRange: unicast CIDR ranges other nodes can reach; loopback, 0/8, multicast and bad syntax are refused by name', () => {
  const r = parseGatewayRange('10.77.77.130/27');
  assert.deepEqual(r, { cidr: '10.77.77.128/27', first: parseGatewayRange('10.77.77.128/27').first, last: parseGatewayRange('10.77.77.128/27').last });
  assert.equal(mirrorAddress(range, r, '127.77.0.1'), '10.77.77.129');
  assert.equal(mirrorAddress(range, r, '127.77.0.30'), '10.77.77.158', 'the last usable address of the /27');
  assert.equal(mirrorAddress(range, r, '127.77.0.31'), undefined, 'past the end of the gateway range');
  assert.equal(mirrorAddress(range, r, '127.78.0.1'), undefined, 'outside the loopback range');
  for (const [bad, why] of [
    ['127.0.0.0/24', /not 0\/8, 127\/8, multicast/],
    ['0.0.0.0/8', /not 0\/8/],
    ['224.0.0.0/24', /multicast/],
    ['10.0.0.0/31', /prefix from \/8 to \/30/],
    ['10.0.0.0', /expected an IPv4 CIDR range/],
    ['10.0.0.256/24', /expected an IPv4 CIDR range/],
  ] as const) {
    assert.throws(() => parseGatewayRange(bad), (err: Error) => why.test(err.message) && err.message.includes(`"${bad}"`), bad);
  }
});

test('gatewaysOf: healthy gateway instances with a valid range; a bad one is reported by id and the others still serve', () => {
  const { gateways, problems } = gatewaysOf('loopmesh-gateway', [
    gatewayInstance('b', { 'loopmesh-gateway-range': '10.77.77.160/27', 'loopmesh-range': '127.77.0.0/16' }),
    gatewayInstance('a', { 'loopmesh-gateway-range': '10.77.77.128/27' }),
    gatewayInstance('no-meta', {}),
    gatewayInstance('garbage', { 'loopmesh-gateway-range': '10.77.77.999/27\nevil' }),
    gatewayInstance('other-range', { 'loopmesh-gateway-range': '10.77.77.192/27', 'loopmesh-range': '127.88.0.0/16' }),
    gatewayInstance('overlap', { 'loopmesh-gateway-range': '10.77.77.144/28' }),
  ], range);
  assert.deepEqual(gateways.map((g) => [g.id, g.range.cidr]), [['gw/a', '10.77.77.128/27'], ['gw/b', '10.77.77.160/27']]);
  assert.equal(problems.length, 4);
  assert.ok(problems.every((p) => p.code === 'LM_ERR_GATEWAY_INVALID'));
  assert.match(problems.find((p) => p.message.includes('gw/no-meta'))?.message ?? '', /has no meta loopmesh-gateway-range/);
  assert.match(problems.find((p) => p.message.includes('gw/garbage'))?.message ?? '', /meta loopmesh-gateway-range is "10\.77\.77\.999\/27\\nevil"/);
  assert.match(problems.find((p) => p.message.includes('gw/other-range'))?.message ?? '', /mirrors the loopback range "127\.88\.0\.0\/16", this node uses 127\.77\.0\.0\/16/);
  assert.match(problems.find((p) => p.message.includes('gw/overlap'))?.message ?? '', /overlaps 10\.77\.77\.128\/27 of gateway "gw\/a"/);
});

test('gatewayBackends: each gateway at the mirrored address and the service port; services start at different gateways', () => {
  const { gateways } = gatewaysOf('loopmesh-gateway', [
    gatewayInstance('a', { 'loopmesh-gateway-range': '10.77.77.128/27' }),
    gatewayInstance('b', { 'loopmesh-gateway-range': '10.77.77.160/27' }),
  ], range);
  const list = gatewayBackends(gateways, range, 'web', '127.77.0.2', 80);
  assert.deepEqual(list.map((g) => `${g.address}:${g.port}`).sort(), ['10.77.77.130:80', '10.77.77.162:80']);
  const firsts = new Set(['web', 'redis', 'api', 'db', 'cache', 'queue', 'search', 'auth'].map((s) => gatewayBackends(gateways, range, s, '127.77.0.2', 80)[0]?.id));
  assert.equal(firsts.size, 2, 'some services start at each gateway');
  // A gateway whose range is too small for this service's place is left out.
  assert.deepEqual(gatewayBackends(gateways, range, 'web', '127.77.0.40', 80), []);
});

test('plan on a node: every route lists its gateways; the gateway service itself is not routed', () => {
  const { gateways } = gatewaysOf('loopmesh-gateway', [gatewayInstance('a', { 'loopmesh-gateway-range': '10.77.77.128/27' })], range);
  const catalog = new Map([
    ['web', [web('web-1')]],
    ['loopmesh-gateway', [gatewayInstance('a', { 'loopmesh-gateway-range': '10.77.77.128/27' })]],
  ]);
  const { routes } = plan(catalog, { web: '127.77.0.3', 'loopmesh-gateway': '127.77.0.9' }, [], { suffix: 'local', empty: 'reject', range, gateways, skip: new Set(['loopmesh-gateway']) });
  assert.deepEqual(routes.map((r) => r.service), ['web']);
  assert.deepEqual(routes[0]?.gateways, [{ id: 'gw/a', address: '10.77.77.131', port: 80, weight: 1, subset: '' }]);
  assert.equal(routes[0]?.address, '127.77.0.3');
});

test('plan on a gateway: routes listen at the mirrored address, list no gateways, and a service past the range is reported', () => {
  const gatewayRange = parseGatewayRange('10.77.77.128/27');
  const catalog = new Map([
    ['web', [web('web-1'), web('looping', '10.77.77.140')]],
    ['far', [web('far-1')]],
  ]);
  const { routes, problems } = plan(catalog, { web: '127.77.0.3', far: '127.77.1.0' }, [], { suffix: 'local', empty: 'reject', range, gatewayRange, gateways: [] });
  assert.deepEqual(routes.map((r) => [r.service, r.address, r.port, r.gateways.length]), [['web', '10.77.77.131', 80, 0]]);
  assert.deepEqual(routes[0]?.backends.map((b) => b.id), ['n2/web-1'], 'an instance inside the gateway range would loop: refused');
  assert.ok(problems.some((p) => p.code === 'LM_ERR_PLAN_SELF_BACKEND' && p.message.includes('n2/looping')));
  const far = problems.find((p) => p.service === 'far');
  assert.equal(far?.code, 'LM_ERR_GATEWAY_NO_ADDRESS');
  assert.match(far?.message ?? '', /127\.77\.1\.0, whose place in 127\.77\.0\.0\/16 is past the end of this gateway's range 10\.77\.77\.128\/27/);
});

const serviceJson = (address: string, extra: Record<string, unknown> = {}): string =>
  JSON.stringify({ version: 1, services: [{ service: 'web', name: 'web', fqdn: 'web.local', address, port: 80, policy: 'p2c-ewma', empty: 'reject', backends: [{ id: 'n2/web-1', address: '10.77.77.12', port: 8080 }], ...extra }] });

test('balancer.json: a node listens on loopback only, a gateway inside its range only; gateways are other hosts, at most 16, never on a gateway', () => {
  const gatewayRange = parseGatewayRange('10.77.77.128/27');
  const gw = { id: 'gw/a', address: '10.77.77.131', port: 80 };
  assert.deepEqual(parseBalancerConfig(serviceJson('127.77.0.3', { gateways: [gw] })).services[0]?.gateways, [{ ...gw, weight: 1, subset: '' }]);
  assert.equal(parseBalancerConfig(serviceJson('10.77.77.131'), 'f', { gatewayRange }).services[0]?.address, '10.77.77.131');
  const refused: Array<[string, RegExp, { gatewayRange?: typeof gatewayRange }]> = [
    [serviceJson('10.77.77.131'), /address: expected a loopback address inside 127\.0\.0\.0\/8.*got "10\.77\.77\.131"/, {}],
    [serviceJson('127.77.0.3'), /address: expected an address inside this gateway's range 10\.77\.77\.128\/27, got "127\.77\.0\.3"/, { gatewayRange }],
    [serviceJson('10.77.77.200'), /inside this gateway's range 10\.77\.77\.128\/27, got "10\.77\.77\.200"/, { gatewayRange }],
    [serviceJson('10.77.77.131', { gateways: [gw] }), /a gateway's config lists 1 gateways; expected none/, { gatewayRange }],
    [serviceJson('127.77.0.3', { gateways: [{ ...gw, address: '127.0.0.1' }] }), /gateways\[0\]\.address: expected a unicast address of another host.*got "127\.0\.0\.1"/, {}],
    [serviceJson('127.77.0.3', { gateways: [{ ...gw, address: 'gw.example' }] }), /gateways\[0\]\.address: expected an IPv4 address, got "gw\.example"/, {}],
    [serviceJson('127.77.0.3', { gateways: Array.from({ length: 17 }, (_, i) => ({ ...gw, id: `g${i}` })) }), /17 gateways; expected at most 16/, {}],
  ];
  for (const [text, why, options] of refused) assert.throws(() => parseBalancerConfig(text, 'balancer.json', options), (err: Error) => why.test(err.message), String(why));
});

test('config: --gateway-range, --gateway-service, --gateway-id and --gateway-check are checked and named', () => {
  const c = resolveConfig({ gatewayRange: '10.77.77.128/27', gatewayId: 'gw-1', gatewayCheck: 'http://127.0.0.1:9191/health/live' });
  assert.equal(c.gatewayRange?.cidr, '10.77.77.128/27');
  assert.equal(c.gatewayService, 'loopmesh-gateway', 'the default');
  assert.equal(resolveConfig({ gatewayService: 'off' }).gatewayService, undefined);
  assert.equal(resolveConfig().gatewayRange, undefined);
  for (const [raw, why] of [
    [{ gatewayRange: '127.0.0.0/24' }, /^--gateway-range: expected a range of unicast addresses other nodes can reach.*"127\.0\.0\.0\/24"/],
    [{ gatewayService: 'bad name!' }, /^--gateway-service: expected a Consul service name .* got "bad name!"/],
    [{ gatewayId: 'x'.repeat(200) }, /^--gateway-id: expected a Consul service ID/],
    [{ gatewayCheck: 'ftp://x/health' }, /^--gateway-check: expected an http:\/\/ or https:\/\/ URL, got "ftp:\/\/x\/health"/],
    [{ gatewayCheck: 'not a url' }, /^--gateway-check: expected an http:\/\/ or https:\/\/ URL such as/],
  ] as const) {
    assert.throws(() => resolveConfig(raw), (err: Error) => why.test(err.message), String(why));
  }
});
