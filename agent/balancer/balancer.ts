import type { Server } from 'node:net';
import type { Logger } from '../log.js';
import type { InheritedSockets, ListeningSocket } from '../hot-restart/handover.js';
import { BalancerError, codes, errorCode, errorMessage } from '../errors.js';
import type { BalancerConfig, DrainPolicy, ServiceSpec } from '../contract/balancer-config.js';
import { addressKey } from './listener.js';
import { Retry } from '../retry.js';
import { ServiceProxy } from './service-proxy.js';
import type { ApplyResult, ServiceStatus } from './status.js';

export type { ApplyResult, BackendStatus, ServiceStatus } from './status.js';

export interface BalancerOptions {
  logger: Logger;
  /** How long one backend gets to accept a connection before the next is tried. */
  connectTimeoutMs?: number;
  /** No bytes either way for this long closes a connection's both sides (default 1 hour). */
  idleTimeoutMs?: number;
  /** How long connections of a removed or moved listener may keep flowing. */
  drainTimeoutMs?: number;
  /** Listening sockets from a predecessor process (hot restart), used before binding anew. */
  inherited?: InheritedSockets;
  /** First pause before a service that could not listen is tried again (doubles up to 30 s). */
  listenRetryMs?: number;
  /** Defaults of the per-service limits (a service's KV traffic document overrides them). */
  maxConnections?: number;
  queue?: number;
  queueTimeoutMs?: number;
  backendDrain?: DrainPolicy;
}

/** The built-in TCP balancer: one listener per service, changed in place by `apply`. */
export class Balancer {
  private readonly services = new Map<string, ServiceProxy>();
  /** Removed services whose connections still drain; kept so `close` can cut them. */
  private readonly retired = new Set<ServiceProxy>();
  private readonly logger: Logger;
  private readonly connectTimeoutMs: number;
  private readonly drainTimeoutMs: number;
  private readonly idleTimeoutMs: number | undefined;
  private readonly limits: Pick<BalancerOptions, 'maxConnections' | 'queue' | 'queueTimeoutMs' | 'backendDrain'>;
  private readonly inherited: InheritedSockets | undefined;
  private applying: Promise<unknown> = Promise.resolve();
  private closed = false;
  /** Every address:port a listener of this balancer accepts on now. */
  private listenerKeys = new Set<string>();
  /** The last config applied, tried again while some service cannot listen (a port taken). */
  private lastConfig: BalancerConfig | undefined;
  private readonly listenRetry: Retry;

  constructor(options: BalancerOptions) {
    this.logger = options.logger.child({ component: 'balancer' });
    this.connectTimeoutMs = options.connectTimeoutMs ?? 2000;
    this.drainTimeoutMs = options.drainTimeoutMs ?? 30000;
    this.idleTimeoutMs = options.idleTimeoutMs;
    this.limits = { maxConnections: options.maxConnections, queue: options.queue, queueTimeoutMs: options.queueTimeoutMs, backendDrain: options.backendDrain };
    this.inherited = options.inherited;
    // A port taken now may be free later: retried with backoff, not only on the next config change.
    this.listenRetry = new Retry(
      () => {
        const config = this.lastConfig;
        if (config && !this.closed) void this.apply(config).catch(() => undefined);
      },
      { baseMs: options.listenRetryMs ?? 2000, maxMs: 30_000 },
    );
  }

  /** Whether address:port is one of this balancer's listeners (a backend there would loop). */
  isOwnListener(address: string, port: number): boolean {
    return this.listenerKeys.has(addressKey(address, port));
  }

  /** Applies the difference to what runs now; calls are queued so that two applies never interleave. */
  apply(config: BalancerConfig): Promise<ApplyResult> {
    const run = this.applying.then(() => this.applyNow(config));
    this.applying = run.catch(() => undefined);
    return run;
  }

  snapshot(): ServiceStatus[] {
    return [...this.services.values()].map((proxy) => proxy.status());
  }

  /** Resolves once no apply is running or queued. */
  settled(): Promise<void> {
    return this.applying.then(() => undefined);
  }

  /** Every socket that accepts for a service now, for a successor process to take over. */
  listeningSockets(): ListeningSocket[] {
    return [...this.services.values()].flatMap((proxy) => {
      const server = proxy.server;
      return proxy.listening && server ? [{ kind: 'tcp' as const, key: proxy.key, handle: server }] : [];
    });
  }

  /** Counters for /metrics; the same view as `snapshot`. */
  metrics(): ServiceStatus[] {
    return this.snapshot();
  }

  /** The listening server of a service, to check that an apply kept it. */
  listenerOf(service: string): Server | undefined {
    return this.services.get(service)?.server;
  }

  /**
   * For a graceful stop: every listener stops accepting at once (so a successor process can bind the
   * same addresses), and this resolves once the open connections have ended or were cut at the
   * drain deadline. `close` afterwards releases the rest.
   */
  async drain(): Promise<void> {
    this.closed = true;
    this.listenRetry.stop();
    await this.applying;
    const proxies = [...this.services.values(), ...this.retired];
    await Promise.all(proxies.map((proxy) => proxy.drain()));
  }

  async close(): Promise<void> {
    this.closed = true;
    this.listenRetry.stop();
    await this.applying;
    const proxies = [...this.services.values(), ...this.retired];
    this.services.clear();
    this.retired.clear();
    await Promise.all(proxies.map((proxy) => proxy.close()));
  }

  private async applyNow(config: BalancerConfig): Promise<ApplyResult> {
    if (this.closed) throw new Error('the balancer is closed');
    const result: ApplyResult = { added: [], removed: [], updated: [], failed: [] };
    const wanted = new Map<string, ServiceSpec>();
    for (const spec of config.services) {
      if (wanted.has(spec.service)) {
        const message = `service "${spec.service}" appears more than once; the first one is used`;
        this.logger.error({ code: codes.balancerConfig, service: spec.service }, message);
        result.failed.push({ service: spec.service, code: codes.balancerConfig, message });
        continue;
      }
      wanted.set(spec.service, spec);
    }

    for (const [service, proxy] of this.services) {
      if (wanted.has(service)) continue;
      this.services.delete(service);
      this.retired.add(proxy);
      void proxy.drain().then(() => this.retired.delete(proxy));
      result.removed.push(service);
    }

    const toListen: ServiceProxy[] = [];
    for (const spec of wanted.values()) {
      let proxy = this.services.get(spec.service);
      if (!proxy) {
        proxy = new ServiceProxy(spec, {
          logger: this.logger,
          connectTimeoutMs: this.connectTimeoutMs,
          drainTimeoutMs: this.drainTimeoutMs,
          idleTimeoutMs: this.idleTimeoutMs,
          ...this.limits,
          inherited: this.inherited,
          isOwnListener: (address, port) => this.isOwnListener(address, port),
        });
        this.services.set(spec.service, proxy);
        toListen.push(proxy);
        continue;
      }
      const changed = proxy.configure(spec);
      if (!proxy.listening) toListen.push(proxy);
      else if (changed) result.updated.push(spec.service);
    }

    const wasListening = new Set(toListen.filter((proxy) => proxy.listeningKey !== undefined));
    // Who listens where now: a service moving onto an address another one leaves is found at once
    // (not by a pass over every service per listener: 10,000 new services were 10^8 steps).
    const listeners = new Map<string, ServiceProxy[]>();
    if (toListen.length > 0) {
      for (const proxy of this.services.values()) {
        const key = proxy.listeningKey;
        if (key !== undefined) listeners.set(key, [...(listeners.get(key) ?? []), proxy]);
      }
    }
    for (const proxy of toListen) {
      this.vacateFor(proxy, listeners);
      const spec = proxy.status();
      try {
        await proxy.listen();
        const now = proxy.listeningKey;
        if (now !== undefined) listeners.set(now, [...(listeners.get(now) ?? []), proxy]);
        (wasListening.has(proxy) ? result.updated : result.added).push(spec.service);
      } catch (cause) {
        const address = addressKey(spec.address, spec.port);
        const error = new BalancerError(
          codes.balancerListen,
          `service "${spec.service}": cannot listen on ${address}: ${errorMessage(cause)}`,
          { cause },
        );
        this.logger.error({ code: error.code, service: spec.service, address, cause: errorCode(cause) }, error.message);
        result.failed.push({ service: spec.service, code: error.code, message: error.message });
      }
    }

    if (result.added.length + result.removed.length + result.updated.length + result.failed.length > 0) {
      this.logger.debug(result, 'balancer config applied');
    }
    this.listenerKeys = new Set([...this.services.values()].flatMap((p) => (p.listeningKey ? [p.listeningKey] : [])));
    this.lastConfig = config;
    if (result.failed.some((f) => f.code === codes.balancerListen)) this.listenRetry.failed();
    else this.listenRetry.succeeded();
    return result;
  }

  /** Another service that moves away from the address this one wants must let go of it first. */
  private vacateFor(proxy: ServiceProxy, listeners: ReadonlyMap<string, readonly ServiceProxy[]>): void {
    for (const other of listeners.get(proxy.key) ?? []) {
      if (other !== proxy && other.listeningKey === proxy.key) other.vacate();
    }
  }
}
