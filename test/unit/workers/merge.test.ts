import { test } from 'node:test';
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import type { RouteReport, StatusReport } from '../../../agent/admin/report.js';
import { readEnv, resolveConfig } from '../../../agent/config/config.js';
import { ConfigError } from '../../../agent/errors.js';
import { mergeReports, RetiredTotals, type WorkerView } from '../../../agent/workers/merge.js';
import { parseStatusReport, parseWorkerMessage } from '../../../agent/workers/messages.js';

function route(service: string, total: number, active: number, listening = true): RouteReport {
  return {
    service,
    name: service,
    fqdn: `${service}.local`,
    address: '127.77.0.1',
    port: 8080,
    listening,
    healthyBackends: 2,
    activeConnections: active,
    totalConnections: total,
    failedConnections: 1,
    retries: 2,
    queuedConnections: 0,
    refusedConnections: 3,
    panic: false,
    unreachable: false,
    gatewayConnections: 1,
    gateways: [{ id: 'gw', address: '10.77.77.129', port: 8080, weight: 1, subset: '', activeConnections: 0, totalConnections: 1, failedConnects: 0, resetsBeforeFirstByte: 0, ejectionsTotal: 0 }],
    backends: [
      { id: 'a', address: '127.0.0.1', port: 1, weight: 1, subset: '', activeConnections: active, totalConnections: total - 1, failedConnects: 1, resetsBeforeFirstByte: 0, ejectionsTotal: 0 },
      { id: 'b', address: '127.0.0.1', port: 2, weight: 1, subset: '', activeConnections: 0, totalConnections: 1, failedConnects: 0, resetsBeforeFirstByte: 0, ejectionsTotal: 0 },
    ],
  };
}

function report(routes: RouteReport[], status: 'ok' | 'failing' = 'ok', answered = 0): StatusReport {
  return {
    node: 'n',
    consul: null,
    lastRenderAt: undefined,
    dataPlane: 'in-process',
    routes,
    problems: status === 'ok' ? [] : [{ service: routes[0]?.service, code: 'LM_ERR_BALANCER_LISTEN', message: 'not listening' }],
    health: { status, reasons: status === 'ok' ? [] : [{ service: routes[0]?.service, code: 'LM_ERR_BALANCER_LISTEN', message: 'not listening' }] },
    dns: { queries: answered, answered, nxdomain: 0, refused: 0, formerr: 0, notimp: 0, dropped: 0, tcpDeadline: 0, tcpLimit: 0, tcpOpen: 1 },
  };
}

const view = (index: number, pid: number, r: StatusReport | undefined, state: WorkerView['state'] = 'serving'): WorkerView => ({ index, pid, state, startedAt: 0, restarts: 0, report: r });

test('merge: counters summed per service and per backend; ports and weights kept; ok when all serve', () => {
  const m = mergeReports('n', [view(0, 10, report([route('web', 10, 1)], 'ok', 5)), view(1, 11, report([route('web', 20, 2)], 'ok', 7))], new RetiredTotals(), 2);
  const web = m.routes[0]!;
  assert.equal(web.totalConnections, 30);
  assert.equal(web.activeConnections, 3);
  assert.equal(web.failedConnections, 2);
  assert.equal(web.refusedConnections, 6);
  assert.equal(web.port, 8080);
  assert.equal(web.healthyBackends, 2);
  assert.deepEqual(web.backends.map((b) => [b.id, b.totalConnections, b.port, b.weight]), [['a', 28, 1, 1], ['b', 2, 2, 1]]);
  assert.equal(web.gatewayConnections, 2, 'connections through gateways add up over the workers');
  assert.deepEqual(web.gateways.map((g) => [g.id, g.totalConnections, g.address]), [['gw', 2, '10.77.77.129']]);
  assert.equal(web.unreachable, false);
  assert.equal(mergeReports('n', [view(0, 10, report([{ ...route('web', 1, 0), unreachable: true }])), view(1, 11, report([route('web', 1, 0)]))], new RetiredTotals(), 2).routes[0]?.unreachable, true, 'unreachable in one worker shows');
  assert.equal(m.dns?.answered, 12);
  assert.equal(m.dns?.tcpOpen, 2);
  assert.equal(m.health.status, 'ok');
  assert.deepEqual(m.workers.map((w) => [w.pid, w.totalConnections, w.alive]), [[10, 10, true], [11, 20, true]]);
});

test('merge: a missing or failing worker fails health; a route listens only if every serving worker listens', () => {
  const down = mergeReports('n', [view(0, 10, report([route('web', 10, 0)])), { ...view(1, 11, undefined, 'down'), problem: { code: 'LM_ERR_WORKER_DOWN', message: 'worker 1 (pid 11) killed by SIGKILL' } }], new RetiredTotals(), 2);
  assert.equal(down.health.status, 'failing');
  assert.deepEqual(down.health.reasons.map((r) => r.code), ['LM_ERR_WORKER_DOWN']);
  assert.equal(down.workers[1]!.alive, false);
  const half = mergeReports('n', [view(0, 10, report([route('web', 1, 0)])), view(1, 11, report([route('web', 1, 0, false)], 'failing'))], new RetiredTotals(), 2);
  assert.equal(half.routes[0]!.listening, false);
  assert.equal(half.health.status, 'failing');
  assert.equal(half.problems.length, 1, 'the same problem from two workers is shown once');
});

test('merge: draining and exited workers keep their counters in the totals; their routes and gauges do not count', () => {
  const retired = new RetiredTotals();
  retired.add(report([route('web', 100, 4), route('gone', 50, 0)], 'ok', 9));
  const draining = view(0, 9, report([route('web', 40, 2, false)]), 'draining');
  const m = mergeReports('n', [draining, view(0, 10, report([route('web', 10, 1)]))], retired, 1);
  assert.deepEqual(m.routes.map((r) => r.service), ['web'], 'a route only the retired worker had is not shown');
  const web = m.routes[0]!;
  assert.equal(web.totalConnections, 150);
  assert.equal(web.activeConnections, 3, 'the draining worker\'s open connections count, the exited one\'s do not');
  assert.equal(web.listening, true, 'the draining worker (listeners closed) does not make the route look down');
  assert.equal(web.backends.find((b) => b.id === 'a')?.totalConnections, 9 + 39 + 99);
  assert.equal(m.health.status, 'ok');
  assert.equal(m.dns?.answered, 9);
  assert.equal(m.dns?.tcpOpen, 2, 'tcpOpen is a gauge: the exited worker\'s is gone');
});

test('worker messages: a report is checked field by field; foreign messages are not ours', () => {
  assert.equal(parseWorkerMessage({ cmd: 'NODE_CLUSTER' }), undefined);
  assert.deepEqual(parseWorkerMessage({ loopmesh: 'started' }), { loopmesh: 'started' });
  const r = parseStatusReport(JSON.parse(JSON.stringify(report([route('web', 1, 0)]))));
  assert.equal(r.routes[0]?.totalConnections, 1);
  assert.throws(() => parseWorkerMessage({ loopmesh: 'report', id: 1, report: { routes: [{ service: 'web' }], problems: [], health: { status: 'ok', reasons: [] }, node: 'n' } }), /report\.routes\[0\]\.backends: expected an array/);
  assert.throws(() => parseWorkerMessage({ loopmesh: 'what' }), /expected \{loopmesh: started\|failed\|report\|final\}/);
});

test('--workers: default 1, N, auto = CPUs; 0, 65, x and 1.5 refused naming the value', () => {
  assert.equal(resolveConfig().workers, 1);
  assert.equal(resolveConfig({ workers: '4' }).workers, 4);
  assert.equal(resolveConfig(readEnv({ LOOPMESH_WORKERS: 'auto' })).workers, Math.min(64, availableParallelism()));
  for (const bad of ['0', '65', 'x', '1.5', '']) {
    assert.throws(
      () => resolveConfig({ workers: bad }),
      (err: unknown) => err instanceof ConfigError && err.message === `--workers: expected a whole number from 1 to 64, or "auto" (one per CPU), got "${bad}"`,
      bad,
    );
  }
});

test('merge: the connect-latency histogram is the workers\' buckets summed, exited workers included; bytes add up', () => {
  const h = (counts: number[], sumSeconds: number) => ({ counts: [...counts, ...new Array<number>(14 - counts.length).fill(0)], count: counts.reduce((a, b) => a + b, 0), sumSeconds });
  const w0 = { ...route('web', 3, 0), bytesIn: 10, bytesOut: 100, connectLatency: h([1, 2], 0.001) };
  const w1 = { ...route('web', 4, 0), bytesIn: 20, bytesOut: 200, connectLatency: h([0, 1, 3], 0.004) };
  const retired = new RetiredTotals();
  retired.add(report([{ ...route('web', 1, 0), bytesIn: 1, bytesOut: 1, connectLatency: h([5], 0.0005) }]));
  // Through the IPC's check, as the supervisor gets them.
  const parsed = [w0, w1].map((r) => parseStatusReport(JSON.parse(JSON.stringify(report([r])))));
  const m = mergeReports('n', [view(0, 10, parsed[0]), view(1, 11, parsed[1])], retired, 2);
  const web = m.routes[0]!;
  assert.deepEqual(web.connectLatency?.counts.slice(0, 4), [6, 3, 3, 0]);
  assert.equal(web.connectLatency?.count, 12);
  assert.ok(Math.abs((web.connectLatency?.sumSeconds ?? 0) - 0.0055) < 1e-9);
  assert.equal(web.bytesIn, 31);
  assert.equal(web.bytesOut, 301);
  assert.equal(w0.connectLatency.counts[0], 1, 'the workers\' reports are not changed by the merge');
  assert.throws(() => parseStatusReport(JSON.parse(JSON.stringify(report([{ ...route('web', 1, 0), connectLatency: { counts: [1], count: 1, sumSeconds: 0 } }])))), /report\.routes\[0\]\.connectLatency: expected \{counts: 14 numbers, count, sumSeconds\}/);
});
