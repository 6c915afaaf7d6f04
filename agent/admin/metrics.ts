import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry, type MetricType } from 'prom-client';
import { connectLatencyBuckets, type LatencyHistogram } from '../balancer/status.js';
import type { ConsulCall } from '../consul/client.js';
import type { StatusReport } from './report.js';

type Route = StatusReport['routes'][number];
type Backend = Route['backends'][number];
type Labels = Record<string, string | number>;
type Rows = (report: StatusReport) => Iterable<[Labels, number]>;

/**
 * Upper bounds (seconds) of the Consul request histogram: a plain read of the local agent takes
 * about a millisecond; a blocking query returns after up to its wait (60 s) and jitter.
 */
export const consulRequestBuckets: readonly number[] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

function countBy<T>(items: readonly T[], key: (item: T) => string): Map<string, number> {
  const out = new Map<string, number>();
  for (const item of items) out.set(key(item), (out.get(key(item)) ?? 0) + 1);
  return out;
}

function* perRoute(report: StatusReport, pick: (r: Route) => number): Iterable<[Labels, number]> {
  for (const r of report.routes) yield [{ service: r.service }, pick(r)];
}

function* perBackend(report: StatusReport, pick: (b: Backend) => number): Iterable<[Labels, number]> {
  for (const r of report.routes) for (const b of r.backends) yield [{ service: r.service, backend: b.id }, pick(b)];
}

/**
 * A histogram whose buckets are counted elsewhere (the balancer's LatencyRecorder, summed over the
 * workers with --workers) and read from the report at each scrape: prom-client's Histogram with its
 * get() answering those counts, so the registry writes it as any other histogram.
 */
/**
 * Each report-based family is built in its own turn of the event loop: at 2,000 services x 5
 * backends a scrape is ~170,000 samples, and built in one go it would hold up the data plane and
 * the watches in this process for the whole scrape.
 */
let turns: Promise<void> = Promise.resolve();
function nextTurn(): Promise<void> {
  // Chained: immediates queued together would all run in one check phase, with no I/O between them.
  const turn = turns.then(() => new Promise<void>((resolve) => setImmediate(resolve)));
  turns = turn;
  return turn;
}

/** The registry writes `# TYPE name ${type}`: prom-client's metrics carry the string ('histogram'), whatever its typings' enum says. */
const histogramType = 'histogram' as unknown as MetricType;

class ReportHistogram extends Histogram<string> {
  private readonly metricName: string;
  private readonly metricHelp: string;

  constructor(
    config: { name: string; help: string; labelNames: string[]; buckets: readonly number[]; registers: Registry[] },
    private readonly source: () => Iterable<[Labels, LatencyHistogram]>,
  ) {
    super({ ...config, buckets: [...config.buckets] });
    this.metricName = config.name;
    this.metricHelp = config.help;
  }

  override async get(): Promise<Awaited<ReturnType<Histogram<string>['get']>>> {
    await nextTurn();
    const values: Awaited<ReturnType<Histogram<string>['get']>>['values'] = [];
    for (const [labels, h] of this.source()) {
      let cumulative = 0;
      connectLatencyBuckets.forEach((le, i) => {
        cumulative += h.counts[i] ?? 0;
        values.push({ metricName: `${this.metricName}_bucket`, labels: { ...labels, le }, value: cumulative });
      });
      values.push({ metricName: `${this.metricName}_bucket`, labels: { ...labels, le: '+Inf' }, value: h.count });
      values.push({ metricName: `${this.metricName}_sum`, labels, value: h.sumSeconds });
      values.push({ metricName: `${this.metricName}_count`, labels, value: h.count });
    }
    return { name: this.metricName, help: this.metricHelp, type: histogramType, values, aggregator: 'sum', collect: () => undefined };
  }

  /** What the registry calls for the text format. */
  getForPromString(): ReturnType<ReportHistogram['get']> {
    return this.get();
  }
}

export interface MetricsOptions {
  /** The agent's own series (Consul requests, renders, reloads); not in a `loopmesh balancer` process. */
  controlPlane?: boolean;
  /** Process CPU, memory, event loop lag, file descriptors (prom-client's default metrics); default true. */
  processMetrics?: boolean;
}

/**
 * /metrics, with prom-client: its own Registry (not prom-client's global one), the process's default
 * metrics, series read from the status report at each scrape (the data plane's counters, which with
 * --workers are the merged report's), and the control plane's own counters and Consul request
 * histogram, fed by the agent as things happen.
 */
export class Metrics {
  readonly registry = new Registry();
  /** The report of the scrape under way. */
  private report: StatusReport | undefined;
  private scrapes: Promise<void> = Promise.resolve();
  /** The series filled from the report at each scrape, emptied after it. */
  private readonly reportMetrics: Array<Gauge | Counter> = [];
  private readonly consulRequests: Histogram<'endpoint' | 'blocking'> | undefined;
  private readonly consulRequestErrors: Counter<'endpoint' | 'code'> | undefined;
  private readonly rendersTotal: Counter | undefined;
  private readonly renderErrorsTotal: Counter | undefined;
  private readonly reloadsTotal: Counter | undefined;

  constructor(options: MetricsOptions = {}) {
    const register = this.registry;
    if (options.processMetrics !== false) collectDefaultMetrics({ register });
    if (options.controlPlane) {
      this.consulRequests = new Histogram({ name: 'loopmesh_consul_request_duration_seconds', help: 'Time of calls to Consul by endpoint (blocking="true": long polls, which wait for a change)', labelNames: ['endpoint', 'blocking'], buckets: [...consulRequestBuckets], registers: [register] });
      this.consulRequestErrors = new Counter({ name: 'loopmesh_consul_request_errors_total', help: 'Failed calls to Consul by endpoint and error code', labelNames: ['endpoint', 'code'], registers: [register] });
      this.rendersTotal = new Counter({ name: 'loopmesh_renders_total', help: 'Renders of the run dir files (one per reconcile of a catalog, KV or address change)', registers: [register] });
      this.renderErrorsTotal = new Counter({ name: 'loopmesh_render_errors_total', help: 'Renders that failed (a template, a write, or the reconcile itself); the previous files stay in service', registers: [register] });
      this.reloadsTotal = new Counter({ name: 'loopmesh_reloads_total', help: 'Reloads of the in-process data plane after the rendered files changed', registers: [register] });
      this.reportSeries();
      this.consulSeries();
    } else this.reportSeries();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /**
   * The exposition of this process's registry, with `report` for the report-based series. Scrapes
   * run one at a time: the collect()s read this.report over several turns of the event loop, and a
   * scrape must not read another's report (an older one would make counters step back).
   */
  text(report: StatusReport): Promise<string> {
    const run = this.scrapes.then(async () => {
      this.report = report;
      try {
        return await this.registry.metrics();
      } finally {
        // The series live until the next scrape fills them again: at 2,000 services x 5 backends
        // they held ~20 MB between scrapes (about 130,000 labelled values), and the report too.
        this.report = undefined;
        for (const metric of this.reportMetrics) metric.reset();
      }
    });
    this.scrapes = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /** From ConsulClient.call(). */
  observeConsul(call: ConsulCall): void {
    this.consulRequests?.observe({ endpoint: call.endpoint, blocking: String(call.blocking) }, call.seconds);
    if (call.code !== undefined) this.consulRequestErrors?.inc({ endpoint: call.endpoint, code: call.code });
  }

  /** From the agent's reconcile: a render, whether it failed, and whether the data plane reloaded. */
  rendered(outcome: { failed: boolean; reloaded: boolean }): void {
    this.rendersTotal?.inc();
    if (outcome.failed) this.renderErrorsTotal?.inc();
    if (outcome.reloaded) this.reloadsTotal?.inc();
  }

  private series(type: 'gauge' | 'counter', name: string, help: string, labelNames: string[], rows: Rows): void {
    const read = (): Iterable<[Labels, number]> => (this.report ? rows(this.report) : []);
    /** Each scrape: the values of the report under way, in a turn of their own. */
    const fill = async (metric: Gauge | Counter, put: (labels: Labels, value: number) => void): Promise<void> => {
      await nextTurn();
      metric.reset();
      // reset() leaves a 0 in a series without labels: a value the report does not have is absent, not 0.
      if (labelNames.length === 0) metric.remove();
      for (const [labels, value] of read()) put(labels, value);
    };
    if (type === 'gauge') {
      const gauge = new Gauge({
        name,
        help,
        labelNames,
        registers: [this.registry],
        async collect() {
          await fill(this, (labels, value) => this.set(labels, value));
        },
      });
      this.reportMetrics.push(gauge);
    } else {
      // A total the balancer already keeps: the Counter is set to it at each scrape (reset, then inc
      // by the total), so it keeps Prometheus's counter type and only grows while the process lives.
      const counter = new Counter({
        name,
        help,
        labelNames,
        registers: [this.registry],
        async collect() {
          await fill(this, (labels, value) => this.inc(labels, value));
        },
      });
      this.reportMetrics.push(counter);
    }
  }

  private consulSeries(): void {
    const s = this.series.bind(this);
    s('gauge', 'loopmesh_consul_connected', '1 when the last call to Consul succeeded; 0 while serving last-known-good routes', [], (r) => (r.consul ? [[{}, r.consul.connected ? 1 : 0]] : []));
    s('counter', 'loopmesh_consul_errors_total', 'Failed calls of the catalog watch to Consul by error code', ['code'], (r) => Object.entries(r.consul?.errors ?? {}).map(([code, n]) => [{ code }, n]));
    s('gauge', 'loopmesh_consul_catalog_index', "The X-Consul-Index of the catalog's service list last read", [], (r) => (r.consul?.catalogIndex !== undefined ? [[{}, r.consul.catalogIndex]] : []));
    s('gauge', 'loopmesh_consul_seconds_since_last_sync', 'Seconds since the last successful read from Consul', [], (r) => (r.consul?.lastContactAt !== undefined ? [[{}, (Date.now() - r.consul.lastContactAt) / 1000]] : []));
    s('gauge', 'loopmesh_last_render_timestamp_seconds', 'When the run dir files were last rendered (Unix time)', [], (r) => (r.lastRenderAt !== undefined ? [[{}, r.lastRenderAt / 1000]] : []));
  }

  private reportSeries(): void {
    const s = this.series.bind(this);
    s('gauge', 'loopmesh_healthy', '1 when /health answers ok: Consul answers, the last render succeeded, every route is served', [], (r) => [[{}, r.health.status === 'ok' ? 1 : 0]]);
    s('gauge', 'loopmesh_health_reasons', 'Why /health is not ok, by code', ['code'], (r) => [...countBy(r.health.reasons, (p) => p.code)].map(([code, n]) => [{ code }, n]));
    s('counter', 'loopmesh_dns_queries_total', 'DNS queries of the responder in this process, by outcome', ['outcome'], (r) => {
      if (!r.dns) return [];
      const { tcpOpen: _open, ...outcomes } = r.dns;
      return Object.entries(outcomes).map(([outcome, n]) => [{ outcome }, n]);
    });
    s('gauge', 'loopmesh_dns_tcp_connections', 'Open DNS-over-TCP connections', [], (r) => (r.dns ? [[{}, r.dns.tcpOpen]] : []));
    s('gauge', 'loopmesh_routes', 'Routes in the loaded balancer config', [], (r) => [[{}, r.routes.length]]);
    s('gauge', 'loopmesh_problems', 'Services skipped or templates failing, by code', ['code'], (r) => [...countBy(r.problems, (p) => p.code)].map(([code, n]) => [{ code }, n]));
    const service = ['service'];
    s('gauge', 'loopmesh_route_listening', '1 when the route listener is open', service, (r) => perRoute(r, (x) => (x.listening ? 1 : 0)));
    s('gauge', 'loopmesh_route_backends', 'Healthy backends per route', service, (r) => perRoute(r, (x) => x.healthyBackends));
    s('gauge', 'loopmesh_route_connections_active', 'Open client connections per route', service, (r) => perRoute(r, (x) => x.activeConnections));
    s('counter', 'loopmesh_route_connections_total', 'Client connections accepted per route', service, (r) => perRoute(r, (x) => x.totalConnections));
    s('counter', 'loopmesh_route_connections_failed_total', 'Client connections closed because no backend could be reached', service, (r) => perRoute(r, (x) => x.failedConnections));
    s('counter', 'loopmesh_route_connect_retries_total', 'Backend connect failures retried on another backend', service, (r) => perRoute(r, (x) => x.retries));
    s('gauge', 'loopmesh_route_connections_queued', 'Client connections waiting for a slot (max connections reached)', service, (r) => perRoute(r, (x) => x.queuedConnections ?? 0));
    s('counter', 'loopmesh_route_connections_refused_total', 'Client connections refused by the connection limit (queue full or timed out)', service, (r) => perRoute(r, (x) => x.refusedConnections ?? 0));
    s('gauge', 'loopmesh_route_panic', '1 while ejections are ignored because too few backends are usable', service, (r) => perRoute(r, (x) => (x.panic ? 1 : 0)));
    s('gauge', 'loopmesh_route_unreachable', '1 while every backend is down from this node: new connections go through a gateway first', service, (r) => perRoute(r, (x) => (x.unreachable ? 1 : 0)));
    s('counter', 'loopmesh_route_gateway_connections_total', 'Client connections forwarded through a gateway (the proxy cluster) because no direct connect worked', service, (r) => perRoute(r, (x) => x.gatewayConnections ?? 0));
    s('counter', 'loopmesh_route_bytes_in_total', 'Bytes read from clients of forwarded connections (closed ones, and open ones so far)', service, (r) => perRoute(r, (x) => x.bytesIn ?? 0));
    s('counter', 'loopmesh_route_bytes_out_total', 'Bytes read from backends and sent on to clients (closed connections, and open ones so far)', service, (r) => perRoute(r, (x) => x.bytesOut ?? 0));
    new ReportHistogram(
      { name: 'loopmesh_route_connect_duration_seconds', help: 'Time of successful connects to a backend or gateway, per route (with --workers: the workers\' buckets summed)', labelNames: service, buckets: connectLatencyBuckets, registers: [this.registry] },
      () => (this.report?.routes ?? []).flatMap((r): [Labels, LatencyHistogram][] => (r.connectLatency ? [[{ service: r.service }, r.connectLatency]] : [])),
    );
    const backend = ['service', 'backend'];
    s('gauge', 'loopmesh_backend_connections_active', 'Open connections per backend', backend, (r) => perBackend(r, (b) => b.activeConnections));
    s('counter', 'loopmesh_backend_connections_total', 'Connections forwarded per backend', backend, (r) => perBackend(r, (b) => b.totalConnections));
    s('counter', 'loopmesh_backend_connect_failures_total', 'Failed connects (refused, unreachable, timed out) per backend', backend, (r) => perBackend(r, (b) => b.failedConnects ?? 0));
    s('counter', 'loopmesh_backend_resets_before_first_byte_total', 'Connections the backend reset before sending a byte', backend, (r) => perBackend(r, (b) => b.resetsBeforeFirstByte ?? 0));
    s('counter', 'loopmesh_backend_connect_errors_total', 'Connect errors per backend by reason: connect (refused, unreachable), timeout, reset (before the first byte)', ['service', 'backend', 'reason'], function* (r) {
      for (const x of r.routes) {
        for (const b of x.backends) {
          const timeouts = b.connectTimeouts ?? 0;
          yield [{ service: x.service, backend: b.id, reason: 'connect' }, Math.max(0, (b.failedConnects ?? 0) - timeouts)];
          yield [{ service: x.service, backend: b.id, reason: 'timeout' }, timeouts];
          yield [{ service: x.service, backend: b.id, reason: 'reset' }, b.resetsBeforeFirstByte ?? 0];
        }
      }
    });
    s('gauge', 'loopmesh_backend_ejected', '1 while passive health has ejected the backend', backend, (r) => perBackend(r, (b) => (b.ejectedUntil ? 1 : 0)));
    s('counter', 'loopmesh_backend_ejections_total', 'Times passive health ejected the backend', backend, (r) => perBackend(r, (b) => b.ejectionsTotal ?? 0));
    s('counter', 'loopmesh_backend_bytes_in_total', 'Bytes read from clients of connections forwarded to the backend', backend, (r) => perBackend(r, (b) => b.bytesIn ?? 0));
    s('counter', 'loopmesh_backend_bytes_out_total', 'Bytes read from the backend and sent on to clients', backend, (r) => perBackend(r, (b) => b.bytesOut ?? 0));
    s('counter', 'loopmesh_split_connections_total', 'Connections per traffic-split subset ("" is the rest)', ['service', 'subset', 'weight'], function* (r) {
      for (const x of r.routes) for (const p of x.split ?? []) yield [{ service: x.service, subset: p.name, weight: p.weight }, p.connections];
    });
  }
}

/** The exposition of one report alone (no process or control-plane series): for a caller without a Metrics. */
export function prometheusText(report: StatusReport): Promise<string> {
  return new Metrics({ processMetrics: false }).text(report);
}
