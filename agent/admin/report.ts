import type { ConsulStatus } from '../consul/catalog-watcher.js';
import type { BackendSpec, BalancePolicy, ServiceSpec } from '../contract/balancer-config.js';
import type { BackendStatus, ServiceStatus, SubsetStatus } from '../balancer/status.js';
import type { DnsStats } from '../dns/server.js';
import { codes, type Problem } from '../errors.js';
import { emptyLatency } from '../balancer/latency.js';

/** What /health answers and `loopmesh status` shows: ok only when everything that should be served is. */
export interface HealthReport {
  status: 'ok' | 'degraded' | 'failing';
  /** Why not ok; empty when ok. */
  reasons: Problem[];
}

/**
 * Problems that mean this node does not serve what it should (503), as against a bad registration
 * in Consul that is skipped and reported (an invalid name, an invalid instance): those are not this
 * node's fault, and every other service is still served.
 */
export const failingCodes: ReadonlySet<string> = new Set([
  codes.planAddressesExhausted,
  codes.planNoAddress,
  codes.planAddressConflict,
  codes.planAddressInvalid,
  codes.renderTemplate,
  codes.renderWrite,
  codes.balancerListen,
  codes.consulStale,
  codes.hostsWrite,
  codes.hostsOwned,
]);

/** connectTimeouts and bytes are absent from an agent of an older version. */
export type BackendReport = Pick<BackendStatus, 'id' | 'address' | 'port' | 'weight' | 'subset' | 'activeConnections' | 'totalConnections' | 'failedConnects' | 'resetsBeforeFirstByte' | 'ejectionsTotal' | 'ejectedUntil' | 'ejectReason'> &
  Partial<Pick<BackendStatus, 'connectTimeouts' | 'bytesIn' | 'bytesOut'>>;

export interface RouteReport
  extends Pick<ServiceStatus, 'service' | 'name' | 'fqdn' | 'address' | 'port' | 'activeConnections' | 'totalConnections' | 'failedConnections' | 'retries' | 'queuedConnections' | 'refusedConnections' | 'gatewayConnections' | 'unreachable'>,
    /** Absent from an agent of an older version. */
    Partial<Pick<ServiceStatus, 'bytesIn' | 'bytesOut' | 'connectLatency'>> {
  /** True while ejections are ignored because too few backends are usable (panic threshold). */
  panic: boolean;
  /** null with --render-only: the separate `loopmesh balancer` listens, not this process. */
  listening: boolean | null;
  healthyBackends: number;
  backends: BackendReport[];
  /** The proxy cluster's addresses for this service, with their counters; empty on a gateway. */
  gateways: BackendReport[];
  /** The balancing policy in force (absent from an agent of an older version). */
  policy?: BalancePolicy;
  /** The traffic split: each subset's weight and the connections it got; absent without a split. */
  split?: SubsetStatus[];
}

/** The JSON of /v1/routes, which `loopmesh status` prints as a table. */
export interface StatusReport {
  /** The local Consul agent's node name, or the hostname until Consul has answered. */
  node: string;
  /** null from a `loopmesh balancer` process: it reads the rendered files and never talks to Consul. */
  consul: ConsulStatus | null;
  lastRenderAt: number | undefined;
  /** Where the balancer runs: in this process, or a separate `loopmesh balancer` (--render-only). */
  dataPlane: 'in-process' | 'separate';
  routes: RouteReport[];
  problems: Problem[];
  /** The same verdict as /health. */
  health: HealthReport;
  /** The in-process DNS responder's counters; absent when DNS is off or another process serves. */
  dns?: DnsStats;
}

/** What the process hosting the admin knows; admin/ reads nothing else. */
export interface ReportInputs {
  node: string;
  consul: ConsulStatus | null;
  lastRenderAt: number | undefined;
  /** The routes to report: the loaded balancer.json's services, or the planned routes with --render-only. */
  specs: readonly ServiceSpec[];
  /** The in-process balancer's live counters; undefined when a separate process serves. */
  served: readonly ServiceStatus[] | undefined;
  problems: Problem[];
  health: HealthReport;
  dns: DnsStats | undefined;
}

/** What is served (the balancer's view), not only what was planned. */
export function routeReport(inputs: ReportInputs): StatusReport {
  const served = inputs.served ? new Map(inputs.served.map((s) => [s.service, s])) : undefined;
  const routes = inputs.specs.map((spec): RouteReport => {
    const s = served?.get(spec.service);
    const backends = s ? s.backends.map(backendReport) : spec.backends.map(plannedBackend);
    const gateways = s ? s.gateways.map(backendReport) : (spec.gateways ?? []).map(plannedBackend);
    return {
      service: spec.service,
      name: spec.name,
      fqdn: spec.fqdn,
      address: spec.address,
      port: spec.port,
      listening: served ? s?.listening ?? false : null,
      healthyBackends: backends.length,
      activeConnections: s?.activeConnections ?? 0,
      totalConnections: s?.totalConnections ?? 0,
      failedConnections: s?.failedConnections ?? 0,
      retries: s?.retries ?? 0,
      queuedConnections: s?.queuedConnections ?? 0,
      refusedConnections: s?.refusedConnections ?? 0,
      panic: s?.panic ?? false,
      unreachable: s?.unreachable ?? false,
      gatewayConnections: s?.gatewayConnections ?? 0,
      bytesIn: s?.bytesIn ?? 0,
      bytesOut: s?.bytesOut ?? 0,
      connectLatency: s?.connectLatency ?? emptyLatency(),
      backends,
      gateways,
      policy: s?.policy ?? spec.policy,
      ...splitReport(spec, s),
    };
  });
  return { node: inputs.node, consul: inputs.consul, lastRenderAt: inputs.lastRenderAt, dataPlane: served ? 'in-process' : 'separate', routes, problems: inputs.problems, health: inputs.health, ...(inputs.dns ? { dns: inputs.dns } : {}) };
}

function backendReport(b: BackendStatus): BackendReport {
  return {
    id: b.id,
    address: b.address,
    port: b.port,
    weight: b.weight,
    subset: b.subset,
    activeConnections: b.activeConnections,
    totalConnections: b.totalConnections,
    failedConnects: b.failedConnects,
    connectTimeouts: b.connectTimeouts,
    resetsBeforeFirstByte: b.resetsBeforeFirstByte,
    bytesIn: b.bytesIn,
    bytesOut: b.bytesOut,
    ejectionsTotal: b.ejectionsTotal,
    ...(b.ejectedUntil ? { ejectedUntil: b.ejectedUntil, ejectReason: b.ejectReason } : {}),
  };
}

/** A backend as planned, before a balancer in this process counts anything. */
function plannedBackend(b: BackendSpec): BackendReport {
  return { id: b.id, address: b.address, port: b.port, weight: b.weight ?? 1, subset: b.subset ?? '', activeConnections: 0, totalConnections: 0, failedConnects: 0, connectTimeouts: 0, resetsBeforeFirstByte: 0, bytesIn: 0, bytesOut: 0, ejectionsTotal: 0 };
}

/** The balancer's split counters, or (when it reports none, e.g. --render-only) the planned split with 0 connections. */
function splitReport(spec: ServiceSpec, served: ServiceStatus | undefined): { split?: SubsetStatus[] } {
  if (served?.split && served.split.length > 0) return { split: served.split.map((p) => ({ name: p.name, weight: p.weight, connections: p.connections })) };
  if (spec.split && spec.split.length > 0) return { split: spec.split.map((p) => ({ name: p.name, weight: p.weight, connections: 0 })) };
  return {};
}

/** Services of the loaded config the balancer does not serve (a port taken, an address refused). */
export function servingProblems(specs: readonly ServiceSpec[], served: readonly ServiceStatus[]): Problem[] {
  const byService = new Map(served.map((s) => [s.service, s]));
  const out: Problem[] = [];
  for (const spec of specs) {
    const s = byService.get(spec.service);
    if (s?.listening && s.address === spec.address && s.port === spec.port) continue;
    out.push({ service: spec.service, code: codes.balancerListen, message: `service "${spec.service}" is not listening on ${spec.address}:${spec.port}${s?.lastError ? `: ${s.lastError}` : ''}` });
  }
  return out;
}
