import type { StatusReport } from './report.js';

function label(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

/** Prometheus text exposition of the status report. */
export function prometheusText(report: StatusReport): string {
  const out: string[] = [];
  const metric = (name: string, type: 'gauge' | 'counter', help: string, rows: [string, number][]): void => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, value] of rows) out.push(`${name}${labels} ${value}`);
  };
  const perRoute = (pick: (r: StatusReport['routes'][number]) => number): [string, number][] =>
    report.routes.map((r) => [`{service="${label(r.service)}"}`, pick(r)]);
  // A `loopmesh balancer` process has no Consul connection to report.
  if (report.consul) {
    const consul = report.consul;
    metric('loopmesh_consul_connected', 'gauge', '1 when the last call to Consul succeeded; 0 while serving last-known-good routes', [['', consul.connected ? 1 : 0]]);
    metric('loopmesh_consul_errors_total', 'counter', 'Failed calls to Consul by error code', Object.entries(consul.errors).map(([code, n]) => [`{code="${label(code)}"}`, n]));
  }
  metric('loopmesh_healthy', 'gauge', '1 when /health answers ok: Consul answers, the last render succeeded, every route is served', [['', report.health.status === 'ok' ? 1 : 0]]);
  metric('loopmesh_health_reasons', 'gauge', 'Why /health is not ok, by code', Object.entries(report.health.reasons.reduce<Record<string, number>>((acc, p) => ({ ...acc, [p.code]: (acc[p.code] ?? 0) + 1 }), {})).map(([code, n]) => [`{code="${label(code)}"}`, n]));
  if (report.dns) {
    const { tcpOpen, ...outcomes } = report.dns;
    metric('loopmesh_dns_queries_total', 'counter', 'DNS queries of the responder in this process, by outcome', Object.entries(outcomes).map(([outcome, n]) => [`{outcome="${label(outcome)}"}`, n]));
    metric('loopmesh_dns_tcp_connections', 'gauge', 'Open DNS-over-TCP connections', [['', tcpOpen]]);
  }
  metric('loopmesh_routes', 'gauge', 'Routes in the loaded balancer config', [['', report.routes.length]]);
  metric('loopmesh_problems', 'gauge', 'Services skipped or templates failing, by code', Object.entries(report.problems.reduce<Record<string, number>>((acc, p) => ({ ...acc, [p.code]: (acc[p.code] ?? 0) + 1 }), {})).map(([code, n]) => [`{code="${label(code)}"}`, n]));
  metric('loopmesh_route_listening', 'gauge', '1 when the route listener is open', perRoute((r) => (r.listening ? 1 : 0)));
  metric('loopmesh_route_backends', 'gauge', 'Healthy backends per route', perRoute((r) => r.healthyBackends));
  metric('loopmesh_route_connections_active', 'gauge', 'Open client connections per route', perRoute((r) => r.activeConnections));
  metric('loopmesh_route_connections_total', 'counter', 'Client connections accepted per route', perRoute((r) => r.totalConnections));
  metric('loopmesh_route_connections_failed_total', 'counter', 'Client connections closed because no backend could be reached', perRoute((r) => r.failedConnections));
  metric('loopmesh_route_connect_retries_total', 'counter', 'Backend connect failures retried on another backend', perRoute((r) => r.retries));
  metric('loopmesh_route_connections_queued', 'gauge', 'Client connections waiting for a slot (max connections reached)', perRoute((r) => r.queuedConnections ?? 0));
  metric('loopmesh_route_connections_refused_total', 'counter', 'Client connections refused by the connection limit (queue full or timed out)', perRoute((r) => r.refusedConnections ?? 0));
  metric('loopmesh_route_panic', 'gauge', '1 while ejections are ignored because too few backends are usable', perRoute((r) => (r.panic ? 1 : 0)));
  metric('loopmesh_route_unreachable', 'gauge', '1 while every backend is down from this node: new connections go through a gateway first', perRoute((r) => (r.unreachable ? 1 : 0)));
  metric('loopmesh_route_gateway_connections_total', 'counter', 'Client connections forwarded through a gateway (the proxy cluster) because no direct connect worked', perRoute((r) => r.gatewayConnections ?? 0));
  const perBackend = (pick: (b: StatusReport['routes'][number]['backends'][number]) => number): [string, number][] =>
    report.routes.flatMap((r) => r.backends.map((b): [string, number] => [`{service="${label(r.service)}",backend="${label(b.id)}"}`, pick(b)]));
  metric('loopmesh_backend_connections_active', 'gauge', 'Open connections per backend', perBackend((b) => b.activeConnections));
  metric('loopmesh_backend_connections_total', 'counter', 'Connections forwarded per backend', perBackend((b) => b.totalConnections));
  metric('loopmesh_backend_connect_failures_total', 'counter', 'Failed connects (refused, unreachable, timed out) per backend', perBackend((b) => b.failedConnects ?? 0));
  metric('loopmesh_backend_resets_before_first_byte_total', 'counter', 'Connections the backend reset before sending a byte', perBackend((b) => b.resetsBeforeFirstByte ?? 0));
  metric('loopmesh_backend_ejected', 'gauge', '1 while passive health has ejected the backend', perBackend((b) => (b.ejectedUntil ? 1 : 0)));
  metric('loopmesh_backend_ejections_total', 'counter', 'Times passive health ejected the backend', perBackend((b) => b.ejectionsTotal ?? 0));
  metric('loopmesh_split_connections_total', 'counter', 'Connections per traffic-split subset ("" is the rest)', report.routes.flatMap((r) => (r.split ?? []).map((p): [string, number] => [`{service="${label(r.service)}",subset="${label(p.name)}",weight="${p.weight}"}`, p.connections])));
  return `${out.join('\n')}\n`;
}
