import type { Server } from 'node:net';
import type { Logger } from '../log.js';
import type { InheritedSockets } from '../hot-restart/handover.js';
import { codes, errorMessage } from '../errors.js';
import { Admission } from './admission.js';
import { BackendPool, defaultOutlier } from './backend-pool.js';
import type { DrainPolicy, ServiceSpec } from '../contract/balancer-config.js';
import { ProxiedConnection, type ConnectionContext, type ServiceCounters } from './connection.js';
import { LatencyRecorder } from './latency.js';
import { addressKey, ServiceListener } from './listener.js';
import type { EffectiveLimits, ServiceStatus } from './status.js';

export interface ServiceProxyOptions {
  logger: Logger;
  /** Whether address:port is one of this balancer's own listeners: a backend there is a loop. */
  isOwnListener: (address: string, port: number) => boolean;
  inherited?: InheritedSockets;
  connectTimeoutMs: number;
  /** No bytes either way for this long closes a connection's both sides; default 1 hour. */
  idleTimeoutMs?: number;
  drainTimeoutMs: number;
  /** Defaults of the limits a service's spec does not set (flags). */
  maxConnections?: number;
  queue?: number;
  queueTimeoutMs?: number;
  backendDrain?: DrainPolicy;
}

export const defaultIdleTimeoutMs = 3_600_000;

function sameSpec(a: ServiceSpec, b: ServiceSpec): boolean {
  // A service unchanged since the last parse is the very same object (see parseBalancerConfig).
  return a === b || JSON.stringify(a) === JSON.stringify(b);
}

/**
 * Everything the balancer runs for one service: its backend pool and counters, the listener on the
 * configured address, and listeners still draining after the service moved.
 */
export class ServiceProxy {
  private current: ServiceListener | undefined;
  private readonly draining = new Map<ServiceListener, Promise<void>>();
  private readonly pool = new BackendPool();
  /** The proxy cluster's addresses for this service: the last resort (see ProxiedConnection). */
  private readonly gateways = new BackendPool();
  private readonly counters: ServiceCounters = { activeConnections: 0, totalConnections: 0, failedConnections: 0, retries: 0, gatewayConnections: 0, bytesIn: 0, bytesOut: 0 };
  private readonly forwarding = new Set<ProxiedConnection>();
  private readonly latency = new LatencyRecorder();
  private readonly admission = new Admission(() => this.effective);
  private effective!: EffectiveLimits;
  private readonly logger: Logger;
  private failing = false;
  private listenError: string | undefined;
  private readonly context: ConnectionContext;

  constructor(
    private spec: ServiceSpec,
    private readonly options: ServiceProxyOptions,
  ) {
    this.logger = options.logger.child({ service: spec.service });
    this.updatePool();
    this.context = this.connectionContext();
  }

  get key(): string {
    // Asked of every service on every apply: kept while the spec stays the same object.
    if (this.keyOfSpec?.spec !== this.spec) this.keyOfSpec = { spec: this.spec, key: addressKey(this.spec.address, this.spec.port) };
    return this.keyOfSpec.key;
  }

  private keyOfSpec: { spec: ServiceSpec; key: string } | undefined;

  /** Where the current listener accepts, which differs from `key` while a move has not succeeded. */
  get listeningKey(): string | undefined {
    return this.current?.listening ? this.current.key : undefined;
  }

  get listening(): boolean {
    return this.listeningKey === this.key;
  }

  get server(): Server | undefined {
    return this.current?.server;
  }

  /** Takes a new spec; backends swap at once. Returns whether anything changed. */
  configure(spec: ServiceSpec): boolean {
    if (sameSpec(this.spec, spec)) return false;
    this.spec = spec;
    this.updatePool();
    this.admission.limitsChanged();
    return true;
  }

  /** The service's limits: its spec (from the KV traffic document) over the process's defaults. */
  limits(): EffectiveLimits {
    return this.effective;
  }

  private effectiveLimits(): EffectiveLimits {
    const o = this.options;
    return {
      connectTimeoutMs: o.connectTimeoutMs,
      idleTimeoutMs: o.idleTimeoutMs ?? defaultIdleTimeoutMs,
      maxConnections: o.maxConnections ?? 0,
      queue: o.queue ?? 0,
      queueTimeoutMs: o.queueTimeoutMs ?? 5000,
      drain: o.backendDrain ?? 'keep',
      drainTimeoutMs: o.drainTimeoutMs,
      ...this.spec.limits,
    };
  }

  /** Opens a listener on the configured address, then drains the one it replaces. */
  async listen(): Promise<void> {
    const listener = new ServiceListener({
      address: this.spec.address,
      port: this.spec.port,
      logger: this.logger,
      inherited: this.options.inherited,
      onConnection: (client, done) => new ProxiedConnection(client, this.context, done),
    });
    try {
      await listener.listen();
    } catch (err) {
      this.listenError = errorMessage(err);
      throw err;
    }
    this.listenError = undefined;
    if (this.current) this.retire(this.current);
    this.current = listener;
    this.logger.info({ address: listener.key }, 'listening');
  }

  /** Frees the address this service is leaving so that another service can take it. */
  vacate(): void {
    if (this.current && this.current.key !== this.key) {
      this.retire(this.current);
      this.current = undefined;
    }
  }

  /** For a removed service: stop accepting; resolves once every connection ended or was cut at the deadline. */
  drain(): Promise<void> {
    if (this.current) this.retire(this.current);
    this.current = undefined;
    return Promise.all(this.draining.values()).then(() => undefined);
  }

  async close(): Promise<void> {
    this.pool.close();
    this.gateways.close();
    const listeners = [...this.draining.keys(), ...(this.current ? [this.current] : [])];
    this.current = undefined;
    this.draining.clear();
    await Promise.all(listeners.map((l) => l.destroy()));
  }

  status(): ServiceStatus {
    const { service, name, fqdn, address, port, empty, policy } = this.spec;
    const now = Date.now();
    const split = this.pool.subsetStatus();
    let bytesIn = this.counters.bytesIn;
    let bytesOut = this.counters.bytesOut;
    for (const c of this.forwarding) {
      const b = c.bytes();
      bytesIn += b.in;
      bytesOut += b.out;
    }
    return {
      service,
      name,
      fqdn,
      address,
      port,
      listening: this.listening,
      ...(this.listenError !== undefined && !this.listening ? { lastError: this.listenError } : {}),
      empty,
      policy,
      ...(split.length > 0 ? { split } : {}),
      limits: this.limits(),
      panic: this.pool.panic(now),
      keptLast: this.pool.keptLast,
      backends: this.pool.list().map((b) => b.status(now)),
      unreachable: this.pool.unreachable(now),
      gateways: this.gateways.list().map((b) => b.status(now)),
      ...this.counters,
      bytesIn,
      bytesOut,
      connectLatency: this.latency.snapshot(),
      queuedConnections: this.admission.queued,
      refusedConnections: this.admission.refused,
    };
  }

  private retire(listener: ServiceListener): void {
    let markDrained = (): void => undefined;
    this.draining.set(listener, new Promise<void>((resolve) => (markDrained = resolve)));
    listener.drain(this.options.drainTimeoutMs, () => {
      this.draining.delete(listener);
      markDrained();
    });
    this.logger.info({ address: listener.key, connections: listener.connectionCount }, 'stopped accepting; draining');
  }

  private updatePool(): void {
    this.effective = this.effectiveLimits();
    const limits = this.effective;
    const change = this.pool.update(this.spec.backends, {
      policy: this.spec.policy,
      empty: this.spec.empty,
      split: this.spec.split ?? [],
      outlier: { ...defaultOutlier, ...this.spec.outlier },
      drain: limits.drain,
      drainTimeoutMs: limits.drainTimeoutMs,
    });
    // Gateways: the lowest connect time, each with its own passive health; no split, no drain of their own.
    this.gateways.update(this.spec.gateways ?? [], { policy: 'p2c-ewma', empty: 'reject', split: [], outlier: { ...defaultOutlier, ...this.spec.outlier }, drain: 'keep', drainTimeoutMs: limits.drainTimeoutMs });
    if (change === 'kept-last') {
      this.logger.warn({ backends: this.pool.list().map((b) => b.spec.id) }, "config gives no backends; 'keep-last' keeps serving the previous ones");
    } else if (change === 'empty') {
      this.logger.warn({ code: codes.balancerNoBackend }, "config gives no backends; 'reject' closes new connections");
    }
  }

  private connectionContext(): ConnectionContext {
    const limits = (): EffectiveLimits => this.limits();
    return {
      pool: this.pool,
      gateways: this.gateways,
      counters: this.counters,
      forwarding: this.forwarding,
      latency: this.latency,
      admission: this.admission,
      get connectTimeoutMs() {
        return limits().connectTimeoutMs;
      },
      get idleTimeoutMs() {
        return limits().idleTimeoutMs;
      },
      logger: this.logger,
      isOwnListener: this.options.isOwnListener,
      onNoBackend: (reason) => {
        if (this.failing) return;
        this.failing = true;
        this.logger.warn({ code: codes.balancerNoBackend, reason }, 'closing client connections: no backend available');
      },
      onForwarded: () => {
        if (!this.failing) return;
        this.failing = false;
        this.logger.info('a backend took a connection again');
      },
    };
  }
}
