import type { BalancePolicy, DrainPolicy, EmptyPolicy } from '../contract/balancer-config.js';
import type { FailureKind } from './backend-pool.js';

/**
 * Upper bounds (seconds) of the connect-latency histogram's buckets: loopback (a quarter of a
 * millisecond) to a slow LAN or a connect that nearly timed out (2 s).
 */
export const connectLatencyBuckets: readonly number[] = [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2];

/** Successful backend connects by time taken: `counts[i]` fell in bucket i (not cumulative); the last is above 2 s. */
export interface LatencyHistogram {
  counts: number[];
  count: number;
  sumSeconds: number;
}

export interface BackendStatus {
  id: string;
  address: string;
  port: number;
  weight: number;
  /** The split subset (a tag), or "" for the rest. */
  subset: string;
  activeConnections: number;
  totalConnections: number;
  /** Connect attempts to this backend that failed (refused, timed out, unreachable). */
  failedConnects: number;
  /** Of failedConnects, those that timed out (connectTimeoutMs). */
  connectTimeouts: number;
  /** Connections the backend reset before sending a byte. */
  resetsBeforeFirstByte: number;
  /** Bytes read from the clients of connections forwarded to this backend (closed ones, and so far of open ones). */
  bytesIn: number;
  /** Bytes read from this backend (sent on to the clients). */
  bytesOut: number;
  /** Failures since the last success; at the outlier threshold (default 3) the backend is ejected. */
  consecutiveFailures: number;
  /** Times passive health ejected this backend. */
  ejectionsTotal: number;
  /** EWMA of connect time, ms (what p2c-ewma compares). */
  ewmaConnectMs?: number;
  /** While ejected (passive health): when the backend is tried again, ISO 8601. */
  ejectedUntil?: string;
  /** While ejected: the failure that ejected it. */
  ejectReason?: FailureKind;
}

/** One subset of a traffic split: its configured share and the connections it actually got. */
export interface SubsetStatus {
  /** A tag, or "" for the instances with none of the split's tags. */
  name: string;
  /** Percent of new connections configured. */
  weight: number;
  /** Connections forwarded to a backend of this subset since the split last changed. */
  connections: number;
}

/** The limits in force for a service: its KV traffic document over the process's flags. */
export interface EffectiveLimits {
  connectTimeoutMs: number;
  idleTimeoutMs: number;
  maxConnections: number;
  queue: number;
  queueTimeoutMs: number;
  drain: DrainPolicy;
  drainTimeoutMs: number;
}

export interface ServiceStatus {
  service: string;
  name: string;
  fqdn: string;
  address: string;
  port: number;
  /** True when a listener accepts on address:port as configured now. */
  listening: boolean;
  /** Why the last attempt to listen failed (EADDRINUSE, ...), while not listening. */
  lastError?: string;
  empty: EmptyPolicy;
  policy: BalancePolicy;
  /** The traffic split and the share each subset got; absent without a split. */
  split?: SubsetStatus[];
  limits: EffectiveLimits;
  /** True while so few backends are usable that ejections are ignored (panic threshold). */
  panic: boolean;
  /** True while 'keep-last' serves the previous backends because the config gave none. */
  keptLast: boolean;
  /** The backends in use, which under 'keep-last' may be an earlier config's. */
  backends: BackendStatus[];
  /** Client connections open, including those on a listener that is draining after a move. */
  activeConnections: number;
  totalConnections: number;
  /** Client connections closed because no backend was set or reachable. */
  failedConnections: number;
  /** Connect failures that were retried on another backend. */
  retries: number;
  /** Bytes read from clients of forwarded connections (closed ones, and so far of open ones). */
  bytesIn: number;
  /** Bytes read from backends and gateways (sent on to the clients). */
  bytesOut: number;
  /** Successful connects to a backend or gateway, by time taken. */
  connectLatency: LatencyHistogram;
  /** True while every backend is down from here: new connections go through a gateway first. */
  unreachable: boolean;
  /** The service's gateways (the proxy cluster), in the order they are tried; empty on a gateway. */
  gateways: BackendStatus[];
  /** Client connections forwarded through a gateway because no direct connect worked. */
  gatewayConnections: number;
  /** Client connections waiting for a slot (maxConnections reached). */
  queuedConnections: number;
  /** Client connections refused by the limit: queue full or waited longer than queueTimeoutMs. */
  refusedConnections: number;
}

export interface ApplyResult {
  /** Services that started listening and were not listening before (new ones, or earlier failures). */
  added: string[];
  /** Services no longer in the config: they stopped accepting and drain. */
  removed: string[];
  /** Services whose spec changed (backends, names, policy) or whose listener moved. */
  updated: string[];
  /** Services that could not listen; everything else keeps serving, and the next apply retries them. */
  failed: { service: string; code: string; message: string }[];
}
