import type { BackendSpec, EmptyPolicy } from './config.js';
import type { BackendStatus } from './status.js';

/** One backend as the balancer uses it; open connections hold it even after it leaves the pool. */
export class Backend {
  activeConnections = 0;
  totalConnections = 0;
  failedConnects = 0;

  constructor(readonly spec: Readonly<BackendSpec>) {}

  get label(): string {
    return `${this.spec.id} (${this.spec.address}:${this.spec.port})`;
  }

  status(): BackendStatus {
    return {
      ...this.spec,
      activeConnections: this.activeConnections,
      totalConnections: this.totalConnections,
      failedConnects: this.failedConnects,
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

  /** The next backend in round-robin order that this connection has not tried yet. */
  pick(tried: ReadonlySet<Backend>): Backend | undefined {
    const backends = this.backends;
    for (let i = 0; i < backends.length; i++) {
      const index = (this.cursor + i) % backends.length;
      const backend = backends[index];
      if (backend && !tried.has(backend)) {
        this.cursor = (index + 1) % backends.length;
        return backend;
      }
    }
    return undefined;
  }
}
