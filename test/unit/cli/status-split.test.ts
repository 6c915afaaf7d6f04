import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseStatusReport, splitTable, statusTable } from '../../../agent/cli/status.js';

function report(routes: Array<Record<string, unknown>>): ReturnType<typeof parseStatusReport> {
  return parseStatusReport({
    node: 'n1',
    consul: { connected: true, errors: {} },
    dataPlane: 'in-process',
    routes: routes.map((r) => ({ service: 'web', name: 'web', fqdn: 'web.local', address: '127.77.0.1', port: 80, listening: true, healthyBackends: 2, backends: [], ...r })),
    problems: [],
    health: { status: 'ok', reasons: [] },
  });
}

test('status: a split shows each subset, its weight and the share of connections it got', () => {
  const text = statusTable(
    report([
      { policy: 'least-conn', split: [{ name: 'canary', weight: 20 }, { name: '', weight: 80 }].map((p, i) => ({ ...p, connections: i === 0 ? 41 : 159 })) },
      { service: 'api', fqdn: 'api.local', address: '127.77.0.2' },
    ]),
  );
  assert.match(text, /^web\s+web\.local\s+127\.77\.0\.1:80\s+least-conn\s+2\s+yes$/m);
  assert.match(text, /^api\s+api\.local\s+127\.77\.0\.2:80\s+-\s+2\s+yes$/m, 'an agent that reports no policy: "-"');
  assert.match(text, /^SERVICE\s+SUBSET\s+WEIGHT\s+CONNECTIONS\s+SHARE$/m);
  assert.match(text, /^web\s+canary\s+20%\s+41\s+20\.5%$/m);
  assert.match(text, /^web\s+\(rest\)\s+80%\s+159\s+79\.5%$/m);
  assert.doesNotMatch(text, /^api\s+\(rest\)/m, 'no split, no subset rows');
});

test('status: no connections yet, a separate balancer process, no split, and a hostile tag', () => {
  assert.match(splitTable(report([{ split: [{ name: 'canary', weight: 5, connections: 0 }, { name: '', weight: 95, connections: 0 }] }])) ?? '', /^web\s+canary\s+5%\s+0\s+-$/m);
  assert.match(splitTable(report([{ listening: null, split: [{ name: 'canary', weight: 5, connections: 0 }] }])) ?? '', /^web\s+canary\s+5%\s+-\s+-$/m);
  assert.equal(splitTable(report([{}])), undefined);
  assert.equal(splitTable(report([{ split: 'nonsense' }])), undefined, 'a wrong shape from another version is left out');
  const hostile = splitTable(report([{ split: [{ name: '\u001b[2Jx', weight: 5, connections: 1 }] }])) ?? '';
  assert.doesNotMatch(hostile, /\u001b/);
  assert.match(hostile, /\\u001b\[2Jx/);
});

test('status: ejected backends with reason, until when and how often; a route in panic says so', () => {
  const text = statusTable(
    report([
      {
        panic: true,
        backends: [
          { id: 'n1/web-1', address: '10.0.0.1', port: 80, ejectedUntil: '2026-11-24T01:00:05.000Z', ejectReason: 'timeout', ejectionsTotal: 2 },
          { id: 'n2/web-2', address: '10.0.0.2', port: 80, ejectionsTotal: 0 },
        ],
      },
    ]),
  );
  assert.match(text, /^SERVICE\s+EJECTED BACKEND\s+REASON\s+UNTIL\s+EJECTIONS$/m);
  assert.match(text, /^web\s+n1\/web-1 10\.0\.0\.1:80\s+timeout\s+2026-11-24T01:00:05\.000Z\s+2$/m);
  assert.doesNotMatch(text, /web-2/, 'a backend that is not ejected is not listed');
  assert.match(text, /^panic web: too few usable backends/m);
  assert.doesNotMatch(statusTable(report([{}])), /EJECTED/, 'nothing ejected: no table');
});

test('status: each service\'s gateways with their connections and state; a service that goes through them says so', () => {
  const text = statusTable(
    report([
      {
        unreachable: true,
        gatewayConnections: 7,
        gateways: [
          { id: 'gw/loopmesh-gateway-10.77.77.128', address: '10.77.77.129', port: 80, totalConnections: 7 },
          { id: 'gw/loopmesh-gateway-10.77.77.160', address: '10.77.77.161', port: 80, totalConnections: 0, ejectedUntil: '2026-11-24T01:00:05.000Z' },
        ],
      },
      { service: 'api', fqdn: 'api.local', address: '127.77.0.2', gateways: [] },
    ]),
  );
  assert.match(text, /^SERVICE\s+GATEWAY\s+ADDRESS:PORT\s+CONNECTIONS\s+STATE$/m);
  assert.match(text, /^web\s+gw\/loopmesh-gateway-10\.77\.77\.128\s+10\.77\.77\.129:80\s+7\s+ok$/m);
  assert.match(text, /^web\s+gw\/loopmesh-gateway-10\.77\.77\.160\s+10\.77\.77\.161:80\s+0\s+ejected until 2026-11-24T01:00:05\.000Z$/m);
  assert.match(text, /^unreachable web: every backend is down from this node; new connections go through a gateway first$/m);
  assert.doesNotMatch(statusTable(report([{}])), /GATEWAY/, 'no gateways (a gateway, or an older agent): no table');
});
