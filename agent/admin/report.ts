import { hostname } from 'node:os';
import type { Agent, HealthReport, Problem } from '../agent.js';
import type { ConsulStatus } from '../consul/catalog-watcher.js';
import type { BackendStatus, ServiceStatus } from '../balancer/status.js';

export type BackendReport = Pick<BackendStatus, 'id' | 'address' | 'port' | 'activeConnections' | 'totalConnections'>;

export interface RouteReport
  extends Pick<ServiceStatus, 'service' | 'name' | 'fqdn' | 'address' | 'port' | 'activeConnections' | 'totalConnections' | 'failedConnections' | 'retries'> {
  /** null with --render-only: the separate `loopmesh balancer` listens, not this process. */
  listening: boolean | null;
  healthyBackends: number;
  backends: BackendReport[];
}

/** The JSON of /v1/routes, which `loopmesh status` prints as a table. */
export interface StatusReport {
  /** The local Consul agent's node name, or the hostname until Consul has answered. */
  node: string;
  consul: ConsulStatus;
  lastRenderAt: number | undefined;
  /** Where the balancer runs: in this process, or a separate `loopmesh balancer` (--render-only). */
  dataPlane: 'in-process' | 'separate';
  routes: RouteReport[];
  problems: Problem[];
  /** The same verdict as /health. */
  health: HealthReport;
}

/** What is served (the balancer's view), not only what was planned. */
export function routeReport(agent: Agent): StatusReport {
  const plane = agent.dataPlane;
  const served = new Map((plane?.balancer.snapshot() ?? []).map((s) => [s.service, s]));
  const specs = plane ? plane.config()?.services ?? [] : agent.routes();
  const routes = specs.map((spec): RouteReport => {
    const s = served.get(spec.service);
    const backends = (s?.backends ?? spec.backends).map((b) => ({
      id: b.id,
      address: b.address,
      port: b.port,
      activeConnections: 'activeConnections' in b && typeof b.activeConnections === 'number' ? b.activeConnections : 0,
      totalConnections: 'totalConnections' in b && typeof b.totalConnections === 'number' ? b.totalConnections : 0,
    }));
    return {
      service: spec.service,
      name: spec.name,
      fqdn: spec.fqdn,
      address: spec.address,
      port: spec.port,
      listening: plane ? s?.listening ?? false : null,
      healthyBackends: backends.length,
      activeConnections: s?.activeConnections ?? 0,
      totalConnections: s?.totalConnections ?? 0,
      failedConnections: s?.failedConnections ?? 0,
      retries: s?.retries ?? 0,
      backends,
    };
  });
  return { node: agent.nodeName ?? hostname(), consul: agent.watcher.status(), lastRenderAt: agent.lastRenderAt, dataPlane: plane ? 'in-process' : 'separate', routes, problems: agent.problems(), health: agent.health() };
}
