import type { BackendReport, HealthReport, RouteReport, StatusReport } from '../admin/report.js';
import type { DnsStats } from '../dns/server.js';
import type { Problem } from '../errors.js';
import { addLatency, emptyLatency } from '../balancer/latency.js';
import type { LatencyHistogram } from '../balancer/status.js';

/** One worker as the supervisor sees it when the admin asks. */
export interface WorkerView {
  /** Its slot, 0..N-1 (a replacement takes the slot of the worker it replaces). */
  index: number;
  pid: number;
  /** draining: replaced by a hot restart, finishing its open connections; its counters still count. */
  state: 'starting' | 'serving' | 'draining' | 'down';
  startedAt: number;
  /** Workers of this slot that died and were replaced since the supervisor started. */
  restarts: number;
  /** Its report now; undefined when it is down or did not answer. */
  report: StatusReport | undefined;
  /** Why it is not counted as ok (down, no answer), under a stable code. */
  problem?: Problem;
}

/** Per worker in /v1/routes (`workers`). */
export interface WorkerSummary {
  index: number;
  pid: number;
  alive: boolean;
  state: WorkerView['state'];
  started: string;
  restarts: number;
  health: HealthReport['status'] | 'unknown';
  activeConnections: number;
  totalConnections: number;
}

export type WorkersStatusReport = StatusReport & { workers: WorkerSummary[] };

/** Numbers that are not summed over workers: where, how much, a time. */
const notAdded: ReadonlySet<string> = new Set(['port', 'weight', 'healthyBackends', 'ejectedUntil']);
/** Gauges: what is open now. An exited worker's gauges are gone; its counters stay. */
const gauges: ReadonlySet<string> = new Set(['activeConnections', 'queuedConnections', 'tcpOpen']);

type Fields = Record<string, unknown>;

/** Adds every summable number of `source` into `target` (counters only, with `countersOnly`). */
function addNumbers(target: Fields, source: Fields, countersOnly = false): void {
  for (const [k, v] of Object.entries(source)) {
    if (typeof v !== 'number' || notAdded.has(k) || (countersOnly && gauges.has(k))) continue;
    const known = target[k];
    target[k] = (typeof known === 'number' ? known : 0) + v;
  }
}

/** A copy with every summable number at 0, to add workers into. */
function zeroed(value: object): Fields {
  const out: Fields = { ...value };
  for (const [k, v] of Object.entries(out)) if (typeof v === 'number' && !notAdded.has(k)) out[k] = 0;
  return out;
}

interface Totals {
  route: Fields;
  backends: Map<string, Fields>;
  gateways: Map<string, Fields>;
  split: Map<string, Fields>;
  /** The connect-latency histogram: the workers' buckets summed. */
  latency?: LatencyHistogram;
}

/** Adds `fields` into the entry `key` of `into`, which starts as a zeroed copy of the first seen. */
function addKeyed(into: Map<string, Fields>, key: string, fields: Fields, countersOnly: boolean): void {
  let known = into.get(key);
  if (!known) {
    known = zeroed({ ...fields });
    into.set(key, known);
  }
  addNumbers(known, fields, countersOnly);
}

/** A route's counters (and its backends' and split subsets'), added into `into`. */
function addRoute(into: Totals, r: RouteReport, countersOnly: boolean): void {
  addNumbers(into.route, r as unknown as Fields, countersOnly);
  for (const b of r.backends) addKeyed(into.backends, b.id, b as unknown as Fields, countersOnly);
  for (const g of r.gateways ?? []) addKeyed(into.gateways, g.id, g as unknown as Fields, countersOnly);
  for (const p of r.split ?? []) addKeyed(into.split, p.name, p as unknown as Fields, countersOnly);
  if (r.connectLatency) into.latency = addLatency(into.latency ?? emptyLatency(), r.connectLatency);
}

/**
 * Counters of workers that exited (drained after a hot restart, or died), from their last report,
 * so that the totals in /metrics do not drop when a worker is replaced.
 */
export class RetiredTotals {
  readonly routes = new Map<string, Totals>();
  dns: Fields | undefined;

  add(report: StatusReport): void {
    for (const r of report.routes) {
      const t = this.routes.get(r.service) ?? { route: {}, backends: new Map<string, Fields>(), gateways: new Map<string, Fields>(), split: new Map<string, Fields>() };
      addRoute(t, r, true);
      this.routes.set(r.service, t);
    }
    if (report.dns) {
      this.dns ??= {};
      addNumbers(this.dns, report.dns as unknown as Fields, true);
    }
  }
}

function sumDns(parts: readonly Fields[]): DnsStats | undefined {
  if (parts.length === 0) return undefined;
  const out: DnsStats = { queries: 0, answered: 0, nxdomain: 0, refused: 0, formerr: 0, notimp: 0, dropped: 0, tcpDeadline: 0, tcpLimit: 0, tcpOpen: 0 };
  for (const p of parts) addNumbers(out as unknown as Fields, p);
  return out;
}

const problemKey = (p: Problem): string => `${p.code}\u0000${p.service ?? ''}\u0000${p.message}`;

function unique(problems: Problem[]): Problem[] {
  const seen = new Map<string, Problem>();
  for (const p of problems) if (!seen.has(problemKey(p))) seen.set(problemKey(p), p);
  return [...seen.values()];
}

/**
 * One report for the whole balancer from its workers' reports: counters summed per service and per
 * backend (draining and exited workers included), a route listening only when every current worker
 * listens on it, and health ok only when all `expected` workers serve and each says ok.
 */
export function mergeReports(node: string, workers: readonly WorkerView[], retired: RetiredTotals, expected: number): WorkersStatusReport {
  // Routes, listening and health come from the serving workers; counters from every worker that answered.
  const current = workers.filter((w) => w.state === 'serving');
  const answered = current.flatMap((w) => (w.report ? [w.report] : []));
  const all = workers.flatMap((w) => (w.report ? [w.report] : []));
  // The routes: those of the current workers (a draining worker's removed routes are gone).
  const totals = new Map<string, Totals>();
  for (const report of answered) {
    for (const r of report.routes) {
      const known = totals.get(r.service);
      if (!known) {
        totals.set(r.service, { route: zeroed({ ...r, backends: [], gateways: [], split: undefined, connectLatency: undefined }), backends: new Map(), gateways: new Map(), split: new Map() });
        continue;
      }
      const route = known.route as unknown as RouteReport;
      route.listening = route.listening === null || r.listening === null ? null : route.listening && r.listening;
      route.healthyBackends = Math.max(route.healthyBackends, r.healthyBackends);
      if ('panic' in r && r.panic === true) (known.route as { panic?: boolean }).panic = true;
      if (r.unreachable === true) (known.route as { unreachable?: boolean }).unreachable = true;
    }
  }
  for (const report of all) {
    for (const r of report.routes) {
      const t = totals.get(r.service);
      if (t) addRoute(t, r, false);
    }
  }
  const routes: RouteReport[] = [];
  for (const [service, t] of totals) {
    const gone = retired.routes.get(service);
    if (gone) {
      addNumbers(t.route, gone.route, true);
      for (const [id, b] of gone.backends) {
        const known = t.backends.get(id);
        if (known) addNumbers(known, b, true);
      }
      for (const [name, p] of gone.split) {
        const known = t.split.get(name);
        if (known) addNumbers(known, p, true);
      }
      if (gone.latency) t.latency = addLatency(t.latency ?? emptyLatency(), gone.latency);
    }
    const { split: _split, connectLatency: _latency, ...route } = t.route;
    routes.push({ ...(route as unknown as RouteReport), ...(t.latency ? { connectLatency: t.latency } : {}), backends: [...t.backends.values()] as unknown as BackendReport[], gateways: [...t.gateways.values()] as unknown as BackendReport[], ...(t.split.size > 0 ? { split: [...t.split.values()] as unknown as NonNullable<RouteReport['split']> } : {}) });
  }

  const workerProblems = workers.flatMap((w) => (w.problem ? [w.problem] : []));
  const missing = expected - current.length;
  const reasons = unique([...answered.flatMap((r) => r.health.reasons), ...workerProblems]);
  let status: HealthReport['status'] = 'ok';
  if (missing > 0 || workerProblems.length > 0 || answered.some((r) => r.health.status === 'failing')) status = 'failing';
  else if (answered.some((r) => r.health.status === 'degraded')) status = 'degraded';
  const dnsParts: Fields[] = all.flatMap((r) => (r.dns ? [r.dns as unknown as Fields] : []));
  if (retired.dns && dnsParts.length > 0) dnsParts.push(retired.dns);
  const dns = sumDns(dnsParts);

  return {
    node,
    consul: null,
    lastRenderAt: undefined,
    dataPlane: 'in-process',
    routes,
    problems: unique([...answered.flatMap((r) => r.problems), ...workerProblems]),
    health: { status, reasons },
    ...(dns ? { dns } : {}),
    workers: workers.map((w) => ({
      index: w.index,
      pid: w.pid,
      alive: w.state !== 'down',
      state: w.state,
      started: new Date(w.startedAt).toISOString(),
      restarts: w.restarts,
      health: w.report?.health.status ?? 'unknown',
      activeConnections: w.report?.routes.reduce((n, r) => n + r.activeConnections, 0) ?? 0,
      totalConnections: w.report?.routes.reduce((n, r) => n + r.totalConnections, 0) ?? 0,
    })),
  };
}
