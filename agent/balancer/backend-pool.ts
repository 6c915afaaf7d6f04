import type { BackendSpec, BalancePolicy, DrainPolicy, EmptyPolicy, OutlierSpec, SubsetSpec } from '../contract/balancer-config.js';
import type { BackendStatus, SubsetStatus } from './status.js';

/** Passive health defaults (Envoy's outlier detection, for TCP): see OutlierSpec. */
export const defaultOutlier: Required<OutlierSpec> = {
  consecutiveFailures: 3,
  baseEjectionMs: 5000,
  maxEjectionMs: 60000,
  maxEjectedPercent: 50,
  panicThresholdPercent: 50,
};

/** Why a backend counts a failure: it refused or was unreachable, did not answer in time, or reset before its first byte. */
export type FailureKind = 'connect' | 'timeout' | 'reset';

/** Weight of a new sample in the connect-time EWMA. */
const ewmaAlpha = 0.3;
/**
 * Time constant of the EWMA's decay toward zero while a backend gets no samples (Finagle's and
 * Linkerd's peak-EWMA do the same): a backend once slow is tried again within tens of seconds.
 */
export const ewmaDecayMs = 10_000;
/**
 * p2c-ewma costs closer than this (or than a factor of two) are a tie. In the namespace lab a first
 * connect to a new neighbour took long enough (address resolution) that, with 1 ms here, ten
 * sequential requests all went to the other instance.
 */
const tieFloorMs = 5;

/** A connection of a backend that the drain policy may cut. */
export interface Cuttable {
  cut(): void;
  /** Bytes so far of an open connection: read from the client (in) and from the backend (out). */
  bytes?(): { in: number; out: number };
}

/** One backend as the balancer uses it; open connections hold it even after it leaves the pool. */
export class Backend {
  activeConnections = 0;
  totalConnections = 0;
  failedConnects = 0;
  /** Of failedConnects, the timeouts. */
  connectTimeouts = 0;
  resetsBeforeFirstByte = 0;
  /** Bytes of this backend's closed connections; open ones are added in status(). */
  bytesIn = 0;
  bytesOut = 0;
  /** Failures (connect, timeout, reset before the first byte) since the last success. */
  consecutiveFailures = 0;
  /** Epoch ms until which the backend is skipped (passive health); 0 when not ejected. */
  ejectedUntil = 0;
  /**
   * Epoch ms until which the backend counts as down, whether or not the ejection cap let it be
   * ejected: when every backend is down (a partition), connections go to the gateways first.
   */
  downUntil = 0;
  /** Ejections since the last success: each one lasts twice as long as the one before. */
  ejectionsInRow = 0;
  ejectionsTotal = 0;
  lastEjectReason: FailureKind | undefined;
  /** EWMA of the connect time in ms at `ewmaAt`; undefined until the first connect. */
  ewmaConnectMs: number | undefined;
  ewmaAt = 0;
  /** Smooth weighted round-robin state. */
  currentWeight = 0;
  weight: number;
  subset: string;
  readonly connections = new Set<Cuttable>();
  /** Set while a removed backend's connections wait for the drain deadline. */
  drainTimer: NodeJS.Timeout | undefined;

  constructor(readonly spec: Readonly<BackendSpec>) {
    this.weight = spec.weight ?? 1;
    this.subset = spec.subset ?? '';
  }

  ejected(now = Date.now()): boolean {
    return this.ejectedUntil > now;
  }

  get label(): string {
    return `${this.spec.id} (${this.spec.address}:${this.spec.port})`;
  }

  /** The EWMA decayed to `now`. */
  ewma(now = Date.now()): number | undefined {
    if (this.ewmaConnectMs === undefined) return undefined;
    return this.ewmaConnectMs * Math.exp(-Math.max(0, now - this.ewmaAt) / ewmaDecayMs);
  }

  sample(ms: number, now = Date.now()): void {
    const current = this.ewma(now);
    this.ewmaConnectMs = current === undefined ? ms : current + ewmaAlpha * (ms - current);
    this.ewmaAt = now;
  }

  status(now = Date.now()): BackendStatus {
    let bytesIn = this.bytesIn;
    let bytesOut = this.bytesOut;
    for (const c of this.connections) {
      const b = c.bytes?.();
      if (b) {
        bytesIn += b.in;
        bytesOut += b.out;
      }
    }
    return {
      id: this.spec.id,
      address: this.spec.address,
      port: this.spec.port,
      weight: this.weight,
      subset: this.subset,
      activeConnections: this.activeConnections,
      totalConnections: this.totalConnections,
      failedConnects: this.failedConnects,
      connectTimeouts: this.connectTimeouts,
      resetsBeforeFirstByte: this.resetsBeforeFirstByte,
      bytesIn,
      bytesOut,
      consecutiveFailures: this.consecutiveFailures,
      ejectionsTotal: this.ejectionsTotal,
      ...(this.ewmaConnectMs !== undefined ? { ewmaConnectMs: Math.round((this.ewma(now) as number) * 1000) / 1000 } : {}),
      ...(this.ejected(now) ? { ejectedUntil: new Date(this.ejectedUntil).toISOString(), ejectReason: this.lastEjectReason } : {}),
    };
  }
}

/** What an update did with an empty backend list. */
export type PoolChange = 'set' | 'empty' | 'kept-last' | 'still-kept-last';

function backendKey(spec: BackendSpec): string {
  return `${spec.id}|${spec.address}|${spec.port}`;
}

export interface PoolSettings {
  policy: BalancePolicy;
  empty: EmptyPolicy;
  split: readonly SubsetSpec[];
  outlier: Required<OutlierSpec>;
  /** Open connections of a backend that left: kept, cut after drainTimeoutMs, or reset at once. */
  drain: DrainPolicy;
  drainTimeoutMs: number;
}

interface Subset {
  spec: SubsetSpec;
  currentWeight: number;
  connections: number;
}

/** Smooth weighted round-robin (nginx): the largest current weight wins and pays the total back. */
function smoothPick<T extends { currentWeight: number }>(items: readonly T[], weightOf: (item: T) => number, advance: boolean): T | undefined {
  let total = 0;
  let best: T | undefined;
  for (const item of items) {
    const w = weightOf(item);
    total += w;
    if (advance) item.currentWeight += w;
    if (!best || item.currentWeight + (advance ? 0 : w) > best.currentWeight + (advance ? 0 : weightOf(best))) best = item;
  }
  if (best && advance) best.currentWeight -= total;
  return best;
}

/**
 * The backend set of one service, swapped whole on a config change (state of backends that stay is
 * kept: counters, latencies, ejections), and the choice of a backend for a connection: split subset
 * first (by weight), then the policy among the subset's usable backends, honouring instance weights.
 */
export class BackendPool {
  private backends: readonly Backend[] = [];
  private keepingLast = false;
  private subsets: Subset[] = [];
  /** Removed backends whose connections still run, by key: one that comes back is the same backend. */
  private readonly removed = new Map<string, Backend>();
  private cursor = 0;
  settings: PoolSettings = { policy: 'p2c-ewma', empty: 'reject', split: [], outlier: defaultOutlier, drain: 'keep', drainTimeoutMs: 30000 };

  constructor(private readonly random: () => number = Math.random) {}

  get keptLast(): boolean {
    return this.keepingLast;
  }

  list(): readonly Backend[] {
    return this.backends;
  }

  update(specs: readonly BackendSpec[], settings: PoolSettings): PoolChange {
    this.settings = settings;
    // The shares status shows are those of the split in force: a changed split starts counting anew.
    const same = JSON.stringify(this.subsets.map((s) => s.spec)) === JSON.stringify(settings.split);
    const known = new Map(this.subsets.map((s) => [s.spec.name, s]));
    this.subsets = settings.split.map((spec) => {
      const old = same ? known.get(spec.name) : undefined;
      return { spec, currentWeight: old?.currentWeight ?? 0, connections: old?.connections ?? 0 };
    });
    if (specs.length === 0 && settings.empty === 'keep-last' && this.backends.length > 0) {
      const change = this.keepingLast ? 'still-kept-last' : 'kept-last';
      this.keepingLast = true;
      return change;
    }
    this.keepingLast = false;
    const current = new Map(this.backends.map((b) => [backendKey(b.spec), b]));
    this.backends = specs.map((spec) => {
      const key = backendKey(spec);
      const backend = current.get(key) ?? this.removed.get(key) ?? new Backend({ ...spec });
      current.delete(key);
      this.removed.delete(key);
      if (backend.drainTimer) clearTimeout(backend.drainTimer);
      backend.drainTimer = undefined;
      backend.weight = spec.weight ?? 1;
      backend.subset = spec.subset ?? '';
      return backend;
    });
    for (const [key, gone] of current) this.retire(key, gone);
    return this.backends.length === 0 ? 'empty' : 'set';
  }

  /** A backend that left the set: its open connections follow the drain policy. */
  private retire(key: string, backend: Backend): void {
    if (backend.connections.size === 0) return;
    const { drain, drainTimeoutMs } = this.settings;
    if (drain === 'keep') return;
    if (drain === 'reset' || drainTimeoutMs === 0) {
      for (const c of [...backend.connections]) c.cut();
      return;
    }
    this.removed.set(key, backend);
    backend.drainTimer = setTimeout(() => {
      backend.drainTimer = undefined;
      this.removed.delete(key);
      for (const c of [...backend.connections]) c.cut();
    }, drainTimeoutMs);
    backend.drainTimer.unref();
  }

  /** Cancels drain timers (the service is closing). */
  close(): void {
    for (const b of this.removed.values()) if (b.drainTimer) clearTimeout(b.drainTimer);
    this.removed.clear();
  }

  /** At most this many backends are ejected at once (at least one). */
  private maxEjected(): number {
    return Math.max(1, Math.floor((this.backends.length * this.settings.outlier.maxEjectedPercent) / 100));
  }

  /** Whether so few backends are usable that ejections are ignored (Envoy's panic threshold). */
  panic(now = Date.now()): boolean {
    const n = this.backends.length;
    if (n === 0) return false;
    const usable = this.backends.filter((b) => !b.ejected(now)).length;
    return usable < n && (usable * 100) / n < this.settings.outlier.panicThresholdPercent;
  }

  /** A connect failure, timeout, or reset before the first byte. Ejects after enough in a row. */
  failed(backend: Backend, kind: FailureKind, elapsedMs: number, now = Date.now()): void {
    if (kind === 'reset') backend.resetsBeforeFirstByte++;
    else backend.failedConnects++;
    if (kind === 'timeout') backend.connectTimeouts++;
    // A failure costs at least what a connect timeout does in the latency that p2c compares.
    if (kind !== 'reset') backend.sample(elapsedMs, now);
    backend.consecutiveFailures++;
    const o = this.settings.outlier;
    if (backend.consecutiveFailures < o.consecutiveFailures) return;
    // Each failed probe past the threshold keeps it down twice as long, like an ejection.
    backend.downUntil = now + Math.min(o.baseEjectionMs * 2 ** Math.min(backend.consecutiveFailures - o.consecutiveFailures, 20), o.maxEjectionMs);
    if (backend.ejected(now)) return;
    const ejectedNow = this.backends.filter((b) => b !== backend && b.ejected(now)).length;
    if (ejectedNow >= this.maxEjected()) return;
    // Once past the threshold every failed probe ejects again, for twice as long as the last time.
    backend.ejectionsInRow++;
    backend.ejectionsTotal++;
    backend.lastEjectReason = kind;
    const doublings = Math.min(backend.ejectionsInRow - 1, 20);
    backend.ejectedUntil = now + Math.min(o.baseEjectionMs * 2 ** doublings, o.maxEjectionMs);
  }

  /** A connect that succeeded (its time feeds the EWMA); failures in a row end at the first byte. */
  connected(backend: Backend, elapsedMs: number, now = Date.now()): void {
    backend.sample(elapsedMs, now);
  }

  /** The backend answered (its first byte) or ended cleanly: it works. */
  succeeded(backend: Backend): void {
    backend.consecutiveFailures = 0;
    backend.ejectionsInRow = 0;
    backend.ejectedUntil = 0;
    backend.downUntil = 0;
  }

  /**
   * One connection tried every backend and each failed (the gateways come next): from here the
   * service looks cut off, so each counts as down for one back-off (not only after the threshold),
   * and the next connections go through a gateway first instead of paying every timeout again.
   */
  sweptDown(now = Date.now()): void {
    const usable = this.backends.filter((b) => b.weight > 0);
    if (usable.length === 0 || !usable.every((b) => b.consecutiveFailures > 0)) return;
    for (const b of usable) b.downUntil = Math.max(b.downUntil, now + this.settings.outlier.baseEjectionMs);
  }

  /**
   * Whether every backend that takes connections is down (ejected, or failing past the threshold
   * while the ejection cap kept it in): from this node none answers, so the gateways go first.
   */
  unreachable(now = Date.now()): boolean {
    const usable = this.backends.filter((b) => b.weight > 0);
    return usable.length > 0 && usable.every((b) => b.ejected(now) || b.downUntil > now);
  }

  /** Connections forwarded per split subset, for the shares status shows. */
  subsetStatus(): SubsetStatus[] {
    return this.subsets.map((s) => ({ name: s.spec.name, weight: s.spec.weight, connections: s.connections }));
  }

  /** Counts a forwarded connection in its backend's subset. */
  forwarded(backend: Backend): void {
    const subset = this.subsets.find((s) => s.spec.name === backend.subset);
    if (subset) subset.connections++;
  }

  /**
   * The backend for a connection that has tried `tried` already. Never one it tried (so a retry never
   * goes first to the backend that just failed); ejected ones only in panic or when nothing else is
   * left; weight 0 only when nothing else is left. Only a connection's first pick advances rotations.
   */
  pick(tried: ReadonlySet<Backend>, now = Date.now()): Backend | undefined {
    const first = tried.size === 0;
    const open = this.backends.filter((b) => !tried.has(b));
    if (open.length === 0) return undefined;
    const panic = this.panic(now);
    let usable = open.filter((b) => b.weight > 0 && (panic || !b.ejected(now)));
    if (usable.length === 0) {
      // Nothing healthy left: the ejected backend whose back-off ends first, then weight 0 ones.
      const ejected = open.filter((b) => b.weight > 0).sort((a, b) => a.ejectedUntil - b.ejectedUntil);
      return ejected[0] ?? open[0];
    }
    if (this.subsets.length > 0) usable = this.inSubset(usable, first);
    return this.byPolicy(usable, first, now);
  }

  /** The backends of the split subset this connection goes to; a subset with none usable gives its share to the others. */
  private inSubset(usable: readonly Backend[], advance: boolean): Backend[] {
    const withBackends = this.subsets.filter((s) => s.spec.weight > 0 && usable.some((b) => b.subset === s.spec.name));
    const subset = smoothPick(withBackends, (s) => s.spec.weight, advance);
    // Every subset with a share has no usable backend: serving from a subset taken out (weight 0)
    // beats refusing the connection.
    if (!subset) return [...usable];
    return usable.filter((b) => b.subset === subset.spec.name);
  }

  private byPolicy(usable: readonly Backend[], advance: boolean, now: number): Backend | undefined {
    if (usable.length <= 1) return usable[0];
    switch (this.settings.policy) {
      case 'round-robin':
        return smoothPick(usable, (b) => b.weight, advance);
      case 'least-conn':
        return this.leastLoaded(usable, (b) => (b.activeConnections + 1) / b.weight, advance);
      case 'p2c-ewma':
        return this.powerOfTwo(usable, now);
    }
  }

  /** The lowest score; ties go round the pool, so an idle pool is not all sent to the first backend. */
  private leastLoaded(usable: readonly Backend[], score: (b: Backend) => number, advance: boolean): Backend | undefined {
    const start = this.cursor % usable.length;
    let best = -1;
    let bestScore = Infinity;
    for (let i = 0; i < usable.length; i++) {
      const index = (start + i) % usable.length;
      const s = score(usable[index] as Backend);
      if (s < bestScore) {
        best = index;
        bestScore = s;
      }
    }
    // The next search starts after the one chosen, so equal scores take turns.
    if (advance) this.cursor = best + 1;
    return usable[best];
  }

  /**
   * Two drawn at random by weight; the one with the lower cost, EWMA connect time x (1 + open
   * connections / weight). Connect time on loopback or a LAN is mostly scheduling noise, so costs
   * within a factor of two (or 5 ms: a first connect that waited for ARP, say) are a tie: the EWMA
   * steers away from a backend that is really
   * slow (an accept queue that overflows, SYNs that go unanswered), not from jitter. A tie goes to
   * the one with clearly fewer open connections for its weight (by one connection or more: one that
   * is just closing is not load), and then to the one furthest behind its share of connections, so
   * sequential traffic follows the weights exactly.
   */
  private powerOfTwo(usable: readonly Backend[], now: number): Backend | undefined {
    const ewmas = new Map(usable.map((b) => [b, b.ewma(now)]));
    const known = [...ewmas.values()].filter((e): e is number => e !== undefined);
    // A backend never connected to yet is priced at the mean of the others, so it gets a fair share.
    const mean = known.length > 0 ? known.reduce((sum, e) => sum + e, 0) / known.length : 1;
    const load = (b: Backend): number => b.activeConnections / b.weight;
    const cost = (b: Backend): number => (ewmas.get(b) ?? mean) * (1 + load(b));
    const a = this.drawByWeight(usable, undefined);
    const b = this.drawByWeight(usable, a);
    if (!a || !b) return a ?? b;
    const [ca, cb] = [cost(a), cost(b)];
    if (Math.abs(ca - cb) > Math.max(tieFloorMs, Math.min(ca, cb))) return cb < ca ? b : a;
    const [la, lb] = [load(a), load(b)];
    if (Math.abs(la - lb) >= 1 / Math.min(a.weight, b.weight)) return lb < la ? b : a;
    return b.totalConnections / b.weight < a.totalConnections / a.weight ? b : a;
  }

  private drawByWeight(usable: readonly Backend[], not: Backend | undefined): Backend | undefined {
    const total = usable.reduce((sum, b) => sum + (b === not ? 0 : b.weight), 0);
    if (total <= 0) return undefined;
    let r = this.random() * total;
    for (const b of usable) {
      if (b === not) continue;
      r -= b.weight;
      if (r < 0) return b;
    }
    // Rounding at the very end of the range.
    for (let i = usable.length - 1; i >= 0; i--) if (usable[i] !== not) return usable[i];
    return undefined;
  }
}
