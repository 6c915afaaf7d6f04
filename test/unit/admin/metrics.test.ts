import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { Metrics } from '../../../agent/admin/metrics.js';
import { routeReport, type StatusReport } from '../../../agent/admin/report.js';
import { AdminServer } from '../../../agent/admin/server.js';
import type { Balancer } from '../../../agent/balancer/balancer.js';
import type { ServiceSpec } from '../../../agent/contract/balancer-config.js';
import { ConsulClient, type ConsulCall } from '../../../agent/consul/client.js';
import { silentLogger } from '../../../agent/log.js';
import { removeDir, startAgent } from '../../support/agent.js';
import { TestConsul } from '../../support/consul.js';
import { eventually, startIdServer, whoAnswers } from '../../support/net.js';
import { config, deadBackend, dial, freePort, service, startBackend, startBalancer, status, waitUntil } from '../balancer/tcp.js';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
  /** name and labels, for comparing scrapes. */
  key: string;
}

interface Exposition {
  types: Map<string, string>;
  helps: Set<string>;
  samples: Sample[];
}

const metricName = '[a-zA-Z_:][a-zA-Z0-9_:]*';
const labelPair = '[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\\\\n]|\\\\["\\\\n])*"';
// Values as Go's ParseFloat reads them (Prometheus's parser): NaN and Inf in any case (prom-client writes "Nan").
const sampleLine = new RegExp(`^(${metricName})(\\{(?:${labelPair})(?:,${labelPair})*\\})? ([Nn][Aa][Nn]|[+-][Ii][Nn][Ff]|[-+]?(?:\\d+\\.?\\d*|\\.\\d+)(?:[eE][-+]?\\d+)?)$`);

function unescape(value: string): string {
  return value.replace(/\\(["\\n])/g, (_m, c: string) => (c === 'n' ? '\n' : c));
}

/** Parses the Prometheus text format strictly: every line a HELP, a TYPE, a sample or empty; every sample of a declared family. */
function parse(text: string): Exposition {
  const types = new Map<string, string>();
  const helps = new Set<string>();
  const samples: Sample[] = [];
  assert.ok(text.endsWith('\n'), 'the exposition ends with a newline');
  for (const line of text.slice(0, -1).split('\n')) {
    if (line === '') continue;
    let m = new RegExp(`^# HELP (${metricName}) (.*)$`).exec(line);
    if (m) {
      helps.add(m[1]!);
      continue;
    }
    m = new RegExp(`^# TYPE (${metricName}) (counter|gauge|histogram|summary|untyped)$`).exec(line);
    if (m) {
      assert.ok(!types.has(m[1]!), `one TYPE line for ${m[1]}`);
      types.set(m[1]!, m[2]!);
      continue;
    }
    m = sampleLine.exec(line);
    assert.ok(m, `a sample line in the Prometheus text format: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    for (const pair of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]!] = unescape(pair[2]!);
    const name = m[1]!;
    const family = types.has(name) ? name : name.replace(/_(bucket|sum|count)$/, '');
    assert.ok(types.has(family), `${name} has a TYPE line`);
    assert.ok(helps.has(family), `${name} has a HELP line`);
    const token = m[3]!.toLowerCase();
    const value = token === '+inf' ? Infinity : token === '-inf' ? -Infinity : token === 'nan' ? NaN : Number(m[3]);
    samples.push({ name, labels, value, key: `${name}${JSON.stringify(Object.entries(labels).sort())}` });
  }
  return { types, helps, samples };
}

function value(e: Exposition, name: string, labels: Record<string, string> = {}): number | undefined {
  return e.samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value;
}

function reportOf(balancer: Balancer, specs: ServiceSpec[]): StatusReport {
  return routeReport({ node: 'n1', consul: null, lastRenderAt: undefined, specs, served: balancer.snapshot(), problems: [], health: { status: 'ok', reasons: [] }, dns: undefined });
}

/** One connection through the balancer: the backend greets "a\n", echoes "ping\n", answers "bye a\n" at the end (13 bytes out, 5 in). */
async function roundTrip(t: TestContext, address: string, port: number): Promise<void> {
  const client = dial(t, address, port);
  await client.waitFor('a\n');
  client.socket.end('ping\n');
  await client.waitFor('bye a\n');
  await client.hungUp;
  client.socket.destroy();
}

test('/metrics: prom-client exposition that parses, process metrics, connect histogram and bytes from real connections, connect errors by reason', async (t) => {
  const a = await startBackend(t, 'a');
  const dead = await deadBackend('dead');
  const address = '127.66.9.1';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  const spec = service('web', address, port, [a.spec, dead]);
  await balancer.apply(config(spec));
  const n = 6;
  for (let i = 0; i < n; i++) await roundTrip(t, address, port);
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'connections to end');

  const admin = new AdminServer({ endpoint: { host: '127.0.0.1', port: 0 }, report: () => reportOf(balancer, [spec]), logger: silentLogger() });
  await admin.start();
  t.after(() => admin.close());
  const res = await fetch(`${admin.url()}/metrics`);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('content-type'), 'text/plain; version=0.0.4; charset=utf-8');
  const e = parse(await res.text());

  // Process metrics (prom-client's defaults, in this registry).
  for (const name of ['process_cpu_user_seconds_total', 'process_resident_memory_bytes', 'nodejs_eventloop_lag_seconds', 'process_open_fds', 'nodejs_heap_size_used_bytes']) {
    assert.ok(e.types.has(name), `${name} is exposed`);
  }
  assert.ok((value(e, 'process_resident_memory_bytes') ?? 0) > 1e6);
  // The series that were there before keep their names, types and labels.
  assert.equal(e.types.get('loopmesh_route_connections_total'), 'counter');
  assert.equal(value(e, 'loopmesh_route_connections_total', { service: 'web' }), n);
  assert.equal(e.types.get('loopmesh_route_connections_active'), 'gauge');
  assert.equal(value(e, 'loopmesh_route_listening', { service: 'web' }), 1);
  assert.equal(value(e, 'loopmesh_healthy'), 1);
  assert.equal(value(e, 'loopmesh_backend_connections_total', { service: 'web', backend: 'a' }), n);
  assert.ok(!e.types.has('loopmesh_consul_connected'), 'no Consul series in a data-plane-only process');
  assert.ok(e.types.has('loopmesh_dns_tcp_connections') && value(e, 'loopmesh_dns_tcp_connections') === undefined, 'no DNS responder here: no sample, not a 0');

  // The connect histogram: every forwarded connection is counted once, buckets cumulative.
  const family = 'loopmesh_route_connect_duration_seconds';
  assert.equal(e.types.get(family), 'histogram');
  const buckets = e.samples.filter((s) => s.name === `${family}_bucket` && s.labels.service === 'web');
  assert.deepEqual(buckets.map((s) => s.labels.le), ['0.00025', '0.0005', '0.001', '0.0025', '0.005', '0.01', '0.025', '0.05', '0.1', '0.25', '0.5', '1', '2', '+Inf']);
  for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i]!.value >= buckets[i - 1]!.value, 'cumulative buckets');
  assert.equal(buckets.at(-1)?.value, n);
  assert.equal(value(e, `${family}_count`, { service: 'web' }), n);
  assert.ok((buckets.find((s) => s.labels.le === '1')?.value ?? 0) === n, 'loopback connects take well under a second');
  const sum = value(e, `${family}_sum`, { service: 'web' }) ?? -1;
  assert.ok(sum > 0 && sum < n, `sum of connect times ${sum} s`);

  // Bytes: 5 from each client, 13 from the backend to each client.
  assert.equal(value(e, 'loopmesh_route_bytes_in_total', { service: 'web' }), 5 * n);
  assert.equal(value(e, 'loopmesh_route_bytes_out_total', { service: 'web' }), 13 * n);
  assert.equal(value(e, 'loopmesh_backend_bytes_in_total', { service: 'web', backend: 'a' }), 5 * n);
  assert.equal(value(e, 'loopmesh_backend_bytes_out_total', { service: 'web', backend: 'a' }), 13 * n);

  // The dead backend: refused connects (reason connect), each retried on a.
  const failed = status(balancer, 'web').backends.find((b) => b.id === 'dead')?.failedConnects ?? 0;
  assert.ok(failed >= 1);
  assert.equal(value(e, 'loopmesh_backend_connect_errors_total', { service: 'web', backend: 'dead', reason: 'connect' }), failed);
  assert.equal(value(e, 'loopmesh_backend_connect_errors_total', { service: 'web', backend: 'dead', reason: 'timeout' }), 0);
  assert.equal(value(e, 'loopmesh_backend_connect_failures_total', { service: 'web', backend: 'dead' }), failed);
  assert.equal(value(e, 'loopmesh_route_connect_retries_total', { service: 'web' }), status(balancer, 'web').retries);
});

test('/metrics: counters never go backwards across scrapes, open connections\' bytes count before they close', async (t) => {
  const a = await startBackend(t, 'a');
  const address = '127.66.9.2';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  const spec = service('web', address, port, [a.spec]);
  await balancer.apply(config(spec));
  const metrics = new Metrics();
  await roundTrip(t, address, port);
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'connection to end');
  const first = parse(await metrics.text(reportOf(balancer, [spec])));

  // An open connection: its bytes so far count, and count again (not twice) once it closes.
  const open = dial(t, address, port);
  await open.waitFor('a\n');
  open.socket.write('ping\n');
  await open.waitFor('a\nping\n');
  const during = parse(await metrics.text(reportOf(balancer, [spec])));
  assert.equal(value(during, 'loopmesh_route_bytes_in_total', { service: 'web' }), 5 + 5);
  assert.equal(value(during, 'loopmesh_route_bytes_out_total', { service: 'web' }), 13 + 7);
  assert.equal(value(during, 'loopmesh_backend_bytes_out_total', { service: 'web', backend: 'a' }), 13 + 7);
  open.socket.end();
  await open.waitFor('bye a\n');
  await open.hungUp;
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'connection to end');
  for (let i = 0; i < 3; i++) await roundTrip(t, address, port);
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'connections to end');
  const last = parse(await metrics.text(reportOf(balancer, [spec])));
  assert.equal(value(last, 'loopmesh_route_bytes_in_total', { service: 'web' }), 5 * 5);
  assert.equal(value(last, 'loopmesh_route_bytes_out_total', { service: 'web' }), 13 * 5);

  let compared = 0;
  let grew = 0;
  for (const [earlier, later] of [[first, during], [during, last]] as const) {
    const before = new Map(earlier.samples.map((s) => [s.key, s]));
    for (const s of later.samples) {
      const family = later.types.get(s.name) ?? later.types.get(s.name.replace(/_(bucket|sum|count)$/, ''));
      const counter = family === 'counter' || (family === 'histogram' && s.name.startsWith('loopmesh_'));
      const b = before.get(s.key);
      if (!counter || !b) continue;
      compared++;
      assert.ok(s.value >= b.value, `${s.key} went from ${b.value} to ${s.value}`);
      if (s.value > b.value) grew++;
    }
  }
  assert.ok(compared > 20, `${compared} counter samples compared`);
  assert.ok(grew > 5, `${grew} counter samples grew`);
});

test('/metrics: label values from service and backend names with quotes, backslashes and newlines are escaped', async () => {
  const odd = 'we"b\\x\ny';
  const report: StatusReport = {
    node: 'n1',
    consul: null,
    lastRenderAt: undefined,
    dataPlane: 'in-process',
    routes: [{ service: odd, name: 'web', fqdn: 'web.local', address: '127.66.9.3', port: 80, listening: true, healthyBackends: 1, activeConnections: 0, totalConnections: 2, failedConnections: 0, retries: 0, queuedConnections: 0, refusedConnections: 0, panic: false, unreachable: false, gatewayConnections: 0, gateways: [], backends: [{ id: `b${odd}`, address: '127.0.0.1', port: 1, weight: 1, subset: '', activeConnections: 0, totalConnections: 2, failedConnects: 0, resetsBeforeFirstByte: 0, ejectionsTotal: 0 }], split: [{ name: odd, weight: 50, connections: 1 }] }],
    problems: [],
    health: { status: 'ok', reasons: [] },
  };
  const text = await new Metrics({ processMetrics: false }).text(report);
  assert.match(text, /^loopmesh_route_connections_total\{service="we\\"b\\\\x\\ny"\} 2$/m);
  const e = parse(text);
  assert.equal(value(e, 'loopmesh_route_connections_total', { service: odd }), 2, 'the label reads back as the service name');
  assert.equal(value(e, 'loopmesh_backend_connections_total', { service: odd, backend: `b${odd}` }), 2);
  assert.equal(value(e, 'loopmesh_split_connections_total', { service: odd, subset: odd, weight: '50' }), 1);
});

test('/metrics: the control plane (Consul request histogram by endpoint, errors by code, catalog index, sync age, renders, reloads)', async (t) => {
  const consul = await TestConsul.start();
  t.after(() => consul.stop());
  const metrics = new Metrics({ controlPlane: true, processMetrics: false });
  const calls: ConsulCall[] = [];
  const observe = (call: ConsulCall): void => {
    calls.push(call);
    metrics.observeConsul(call);
  };
  const client = new ConsulClient({ url: consul.url, onCall: observe });
  t.after(() => client.close());
  await client.healthService('web');
  await client.healthService('db');
  await client.catalogServices();
  const listed = await client.catalogServices();
  await client.catalogServices({ index: listed.index, waitMs: 1000 });
  // Nothing listens here: a refused call.
  const nowhere = new ConsulClient({ url: `http://127.0.0.1:${await freePort('127.0.0.1')}`, onCall: observe });
  t.after(() => nowhere.close());
  await assert.rejects(nowhere.catalogServices());
  metrics.rendered({ failed: false, reloaded: true });
  metrics.rendered({ failed: true, reloaded: false });

  const report: StatusReport = {
    node: 'n1',
    consul: { connected: true, lastContactAt: Date.now() - 2000, lastError: undefined, errors: { LM_ERR_CONSUL_UNREACHABLE: 1 }, catalogIndex: Number(listed.index) },
    lastRenderAt: Date.now(),
    dataPlane: 'separate',
    routes: [],
    problems: [],
    health: { status: 'ok', reasons: [] },
  };
  const e = parse(await metrics.text(report));
  assert.equal(e.types.get('loopmesh_consul_request_duration_seconds'), 'histogram');
  assert.equal(value(e, 'loopmesh_consul_request_duration_seconds_count', { endpoint: 'health.service', blocking: 'false' }), 2, 'one endpoint label for every service');
  assert.equal(value(e, 'loopmesh_consul_request_duration_seconds_count', { endpoint: 'catalog.service.list', blocking: 'false' }), 3);
  assert.equal(value(e, 'loopmesh_consul_request_duration_seconds_count', { endpoint: 'catalog.service.list', blocking: 'true' }), 1);
  assert.ok(!e.samples.some((s) => s.labels.endpoint?.includes('(')), 'no argument in the endpoint label');
  const refused = calls.find((c) => c.code !== undefined);
  const code = refused?.code ?? '';
  assert.ok(code.startsWith('LM_ERR_CONSUL'), `a refused call has a code: ${code}`);
  assert.equal(value(e, 'loopmesh_consul_request_errors_total', { endpoint: 'catalog.service.list', code }), 1);
  assert.equal(value(e, 'loopmesh_consul_catalog_index'), Number(listed.index));
  const age = value(e, 'loopmesh_consul_seconds_since_last_sync') ?? -1;
  assert.ok(age >= 2 && age < 60, `sync age ${age}`);
  assert.equal(value(e, 'loopmesh_consul_connected'), 1);
  assert.equal(value(e, 'loopmesh_consul_errors_total', { code: 'LM_ERR_CONSUL_UNREACHABLE' }), 1);
  assert.equal(value(e, 'loopmesh_renders_total'), 2);
  assert.equal(value(e, 'loopmesh_render_errors_total'), 1);
  assert.equal(value(e, 'loopmesh_reloads_total'), 1);
});

test('a running agent against a real Consul: /metrics has the control plane\'s series next to the data plane\'s', { timeout: 60_000 }, async (t) => {
  const consul = await TestConsul.start();
  t.after(() => consul.stop());
  const backend = await startIdServer('m-web');
  t.after(() => backend.close());
  await consul.register({ id: 'm-web-1', name: 'm-web', port: backend.port, ttlCheck: { passing: true } });
  const { agent, dir, stop } = await startAgent(consul.url, { dns: 'off' });
  t.after(async () => {
    await stop();
    await removeDir(dir);
  });
  const route = await eventually(() => agent.statusReport().routes.find((r) => r.service === 'm-web' && r.listening && r.healthyBackends === 1), 20_000, 'm-web routed');
  assert.equal(await whoAnswers(route.address, route.port), 'm-web');
  // The reconcile counts its render once the data plane's reload (and the hosts file) is done: a moment after the route serves.
  const scrape = async (): Promise<Exposition> => {
    const res = await fetch(`${agent.adminUrl()}/metrics`);
    assert.equal(res.headers.get('content-type'), 'text/plain; version=0.0.4; charset=utf-8');
    return parse(await res.text());
  };
  const e = await eventually(async () => {
    const x = await scrape();
    return (value(x, 'loopmesh_renders_total') ?? 0) >= 1 ? x : undefined;
  }, 20_000, 'a render counted in loopmesh_renders_total');
  assert.ok((value(e, 'loopmesh_reloads_total') ?? 0) >= 1, 'the in-process data plane was reloaded with the rendered files');
  assert.equal(value(e, 'loopmesh_render_errors_total'), 0);
  assert.ok((value(e, 'loopmesh_consul_request_duration_seconds_count', { endpoint: 'health.service', blocking: 'false' }) ?? 0) >= 1, 'the service was read');
  assert.ok((value(e, 'loopmesh_consul_catalog_index') ?? 0) > 0);
  const age = value(e, 'loopmesh_consul_seconds_since_last_sync') ?? -1;
  assert.ok(age >= 0 && age < 30, `sync age ${age} s`);
  assert.equal(value(e, 'loopmesh_consul_connected'), 1);
  assert.equal(value(e, 'loopmesh_route_connect_duration_seconds_count', { service: 'm-web' }), 1);
  assert.ok(e.types.has('process_cpu_user_seconds_total'));
});

test('/metrics: the series filled from a report are let go after the scrape (they held ~20 MB between scrapes at 10,000 backends)', async () => {
  const backends = Array.from({ length: 500 }, (_, i) => ({ id: `b${i}`, address: '127.0.0.1', port: 1000 + i, weight: 1, subset: '', activeConnections: 0, totalConnections: i, failedConnects: 0, resetsBeforeFirstByte: 0, ejectionsTotal: 0 }));
  const report: StatusReport = {
    node: 'n1',
    consul: null,
    lastRenderAt: undefined,
    dataPlane: 'in-process',
    routes: [{ service: 'web', name: 'web', fqdn: 'web.local', address: '127.66.9.3', port: 80, listening: true, healthyBackends: 500, activeConnections: 0, totalConnections: 2, failedConnections: 0, retries: 0, queuedConnections: 0, refusedConnections: 0, panic: false, unreachable: false, gatewayConnections: 0, gateways: [], backends, split: [] }],
    problems: [],
    health: { status: 'ok', reasons: [] },
  };
  const metrics = new Metrics({ processMetrics: false });
  const held = (name: string): number => Object.keys((metrics.registry.getSingleMetric(name) as unknown as { hashMap: Record<string, unknown> }).hashMap).length;
  for (let scrape = 1; scrape <= 2; scrape++) {
    const e = parse(await metrics.text(report));
    assert.equal(e.samples.filter((s) => s.name === 'loopmesh_backend_connections_total').length, 500, `scrape ${scrape} has every backend`);
    assert.equal(value(e, 'loopmesh_backend_connections_total', { service: 'web', backend: 'b499' }), 499);
    assert.equal(held('loopmesh_backend_connections_total'), 0, 'no backend series held after the scrape');
    assert.equal(held('loopmesh_backend_connect_errors_total'), 0, 'no connect-error series held after the scrape');
  }
});
