import type { BackendSpec, EmptyPolicy } from '../contract/balancer-config.js';
import type { BackendStatus } from './status.js';

/** Connect failures in a row after which a backend is skipped while others are available. */
export const ejectAfterFailures = 3;
/** How long the first ejection lasts; each further failed probe doubles it, up to `maxEjectionMs`. */
export const baseEjectionMs = 5000;
export const maxEjectionMs = 60000;

/** One backend as the balancer uses it; open connections hold it even after it leaves the pool. */
export class Backend {
  activeConnections = 0;
  totalConnections = 0;
  failedConnects = 0;
  /** Connect failures since the last successful connect. */
  consecutiveFailures = 0;
  /** Epoch ms until which the backend is skipped (passive health); 0 when not ejected. */
  ejectedUntil = 0;

  constructor(readonly spec: Readonly<BackendSpec>) {}

  ejected(now = Date.now()): boolean {
    return this.ejectedUntil > now;
  }

  connectFailed(now = Date.now()): void {
    this.failedConnects++;
    this.consecutiveFailures++;
    if (this.consecutiveFailures < ejectAfterFailures) return;
    // Once past the threshold every failed probe ejects again, for twice as long as the last time.
    const doublings = Math.min(this.consecutiveFailures - ejectAfterFailures, 10);
    this.ejectedUntil = now + Math.min(baseEjectionMs * 2 ** doublings, maxEjectionMs);
  }

  connectSucceeded(): void {
    this.consecutiveFailures = 0;
    this.ejectedUntil = 0;
  }

  get label(): string {
    return `${this.spec.id} (${this.spec.address}:${this.spec.port})`;
  }

  status(): BackendStatus {
    return {
      ...this.spec,
      activeConnections: this.activeConnections,
      totalConnections: this.totalConnections,
      failedConnects: this.failedConnects,
      consecutiveFailures: this.consecutiveFailures,
      ...(this.ejected() ? { ejectedUntil: new Date(this.ejectedUntil).toISOString() } : {}),
    };
  }
}

/** What an update did with an empty backend list. */
export type PoolChange = 'set' | 'empty' | 'kept-last' | 'still-kept-last';

function backendKey(spec: BackendSpec): string {
  return `${spec.id}|${spec.address}|${spec.port}`;
}

/** The backend set of one service, swapped whole, and the round-robin choice over it. */
export class BackendPool {
  private backends: readonly Backend[] = [];
  private cursor = 0;
  private keepingLast = false;

  get keptLast(): boolean {
    return this.keepingLast;
  }

  list(): readonly Backend[] {
    return this.backends;
  }

  update(specs: readonly BackendSpec[], empty: EmptyPolicy): PoolChange {
    if (specs.length === 0 && empty === 'keep-last' && this.backends.length > 0) {
      const change = this.keepingLast ? 'still-kept-last' : 'kept-last';
      this.keepingLast = true;
      return change;
    }
    this.keepingLast = false;
    const known = new Map(this.backends.map((b) => [backendKey(b.spec), b]));
    this.backends = specs.map((spec) => known.get(backendKey(spec)) ?? new Backend({ ...spec }));
    return this.backends.length === 0 ? 'empty' : 'set';
  }

  /**
   * The next backend in round-robin order that this connection has not tried yet, skipping ejected
   * ones unless nothing else is left. Only a connection's first pick advances the rotation: if a
   * retry advanced it too, a failing backend would come first for every new connection.
   */
  pick(tried: ReadonlySet<Backend>, now = Date.now()): Backend | undefined {
    const backends = this.backends;
    const first = tried.size === 0;
    let fallback: { backend: Backend; index: number } | undefined;
    for (let i = 0; i < backends.length; i++) {
      const index = (this.cursor + i) % backends.length;
      const backend = backends[index];
      if (!backend || tried.has(backend)) continue;
      if (backend.ejected(now)) {
        // Of the ejected ones, the one whose back-off ends first is tried when nothing else is left.
        if (!fallback || backend.ejectedUntil < fallback.backend.ejectedUntil) fallback = { backend, index };
        continue;
      }
      if (first) this.cursor = (index + 1) % backends.length;
      return backend;
    }
    if (fallback && first) this.cursor = (fallback.index + 1) % backends.length;
    return fallback?.backend;
  }
}
