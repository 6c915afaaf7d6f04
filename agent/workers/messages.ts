import type { RouteReport, StatusReport } from '../admin/report.js';
import { DataPlaneError, codes, type Problem } from '../errors.js';
import { describe, isRecord } from '../validate.js';
import { connectLatencyBuckets } from '../balancer/status.js';

/**
 * The IPC between the `loopmesh balancer --workers N` supervisor (cluster primary) and its workers.
 * Node's cluster module sends its own messages on the same channel (cmd NODE_CLUSTER, never seen
 * here); ours carry `loopmesh`.
 */

/** Primary -> worker. */
export type PrimaryMessage = { loopmesh: 'report'; id: number } | { loopmesh: 'drain' };

/** Worker -> primary. */
export type WorkerMessage =
  | { loopmesh: 'started' }
  | { loopmesh: 'failed'; message: string }
  | { loopmesh: 'report'; id: number; report: StatusReport }
  /** Right before a drained worker exits: its last counters, kept in the totals. */
  | { loopmesh: 'final'; report: StatusReport };

/** The environment that tells a forked worker its slot (0 writes the hosts file). */
export const workerIndexEnv = 'LOOPMESH_WORKER_INDEX';

function bad(what: string, value: unknown): DataPlaneError {
  return new DataPlaneError(codes.workerDown, `worker IPC: ${what}, got ${describe(value)}`);
}

export function parsePrimaryMessage(value: unknown): PrimaryMessage | undefined {
  if (!isRecord(value) || value.loopmesh === undefined) return undefined;
  if (value.loopmesh === 'drain') return { loopmesh: 'drain' };
  if (value.loopmesh === 'report' && typeof value.id === 'number') return { loopmesh: 'report', id: value.id };
  throw bad('expected {loopmesh: "report", id} or {loopmesh: "drain"}', value);
}

const num = (r: Record<string, unknown>, key: string, where: string): number => {
  const v = r[key];
  if (typeof v !== 'number' || !Number.isFinite(v)) throw bad(`${where}.${key}: expected a number`, v);
  return v;
};
const str = (r: Record<string, unknown>, key: string, where: string): string => {
  const v = r[key];
  if (typeof v !== 'string') throw bad(`${where}.${key}: expected a string`, v);
  return v;
};

function parseProblem(value: unknown, where: string): Problem {
  if (!isRecord(value)) throw bad(`${where}: expected a problem object`, value);
  const service = value.service;
  if (service !== undefined && typeof service !== 'string') throw bad(`${where}.service: expected a string`, service);
  return { ...(service !== undefined ? { service } : {}), code: str(value, 'code', where), message: str(value, 'message', where) };
}

/**
 * A route of a worker's report: the fields the merge reads are checked; the rest (counters the
 * balancer adds over time) pass through as our own worker sent them.
 */
function parseRoute(value: unknown, where: string): RouteReport {
  if (!isRecord(value)) throw bad(`${where}: expected a route object`, value);
  const backends = value.backends;
  if (!Array.isArray(backends)) throw bad(`${where}.backends: expected an array`, backends);
  const listening = value.listening;
  if (typeof listening !== 'boolean' && listening !== null) throw bad(`${where}.listening: expected true, false or null`, listening);
  for (const k of ['service', 'name', 'fqdn', 'address']) str(value, k, where);
  for (const k of ['port', 'healthyBackends', 'activeConnections', 'totalConnections', 'failedConnections', 'retries']) num(value, k, where);
  backends.forEach((b, i) => {
    const at = `${where}.backends[${i}]`;
    if (!isRecord(b)) throw bad(`${at}: expected a backend object`, b);
    str(b, 'id', at);
    num(b, 'activeConnections', at);
    num(b, 'totalConnections', at);
  });
  const latency = value.connectLatency;
  if (latency !== undefined) {
    const ok = isRecord(latency) && Array.isArray(latency.counts) && latency.counts.length === connectLatencyBuckets.length + 1 && latency.counts.every((n) => typeof n === 'number' && Number.isFinite(n)) && typeof latency.count === 'number' && typeof latency.sumSeconds === 'number';
    if (!ok) throw bad(`${where}.connectLatency: expected {counts: ${connectLatencyBuckets.length + 1} numbers, count, sumSeconds}`, latency);
  }
  if (value.split !== undefined && !(Array.isArray(value.split) && value.split.every((p) => isRecord(p) && typeof p.name === 'string'))) throw bad(`${where}.split: expected an array of {name, weight, connections}`, value.split);
  return value as unknown as RouteReport;
}

/** A worker's balancer report, checked field by field (what the merge reads). */
export function parseStatusReport(value: unknown): StatusReport {
  if (!isRecord(value)) throw bad('report: expected an object', value);
  const { routes, problems, health, dns } = value;
  if (!Array.isArray(routes)) throw bad('report.routes: expected an array', routes);
  if (!Array.isArray(problems)) throw bad('report.problems: expected an array', problems);
  if (!isRecord(health) || (health.status !== 'ok' && health.status !== 'degraded' && health.status !== 'failing') || !Array.isArray(health.reasons)) throw bad('report.health: expected {status: ok|degraded|failing, reasons}', health);
  let dnsStats: StatusReport['dns'];
  if (dns !== undefined) {
    if (!isRecord(dns)) throw bad('report.dns: expected an object', dns);
    const keys = ['queries', 'answered', 'nxdomain', 'refused', 'formerr', 'notimp', 'dropped', 'tcpDeadline', 'tcpLimit', 'tcpOpen'] as const;
    dnsStats = Object.fromEntries(keys.map((k) => [k, num(dns, k, 'report.dns')])) as NonNullable<StatusReport['dns']>;
  }
  const reasons = health.reasons.map((p, i) => parseProblem(p, `report.health.reasons[${i}]`));
  return {
    node: str(value, 'node', 'report'),
    consul: null,
    lastRenderAt: undefined,
    dataPlane: 'in-process',
    routes: routes.map((r, i) => parseRoute(r, `report.routes[${i}]`)),
    problems: problems.map((p, i) => parseProblem(p, `report.problems[${i}]`)),
    health: { status: health.status, reasons },
    ...(dnsStats ? { dns: dnsStats } : {}),
  };
}

export function parseWorkerMessage(value: unknown): WorkerMessage | undefined {
  if (!isRecord(value) || value.loopmesh === undefined) return undefined;
  switch (value.loopmesh) {
    case 'started':
      return { loopmesh: 'started' };
    case 'failed':
      if (typeof value.message === 'string') return { loopmesh: 'failed', message: value.message };
      break;
    case 'report':
      if (typeof value.id === 'number') return { loopmesh: 'report', id: value.id, report: parseStatusReport(value.report) };
      break;
    case 'final':
      return { loopmesh: 'final', report: parseStatusReport(value.report) };
  }
  throw bad('expected {loopmesh: started|failed|report|final}', value);
}
