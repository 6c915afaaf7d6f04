import type { BackendSpec, EmptyPolicy } from '../contract/balancer-config.js';

export interface BackendStatus extends BackendSpec {
  activeConnections: number;
  totalConnections: number;
  /** Connect attempts to this backend that failed (refused, timed out, unreachable). */
  failedConnects: number;
  /** Connect failures since the last successful connect; at 3 the backend is ejected. */
  consecutiveFailures: number;
  /** While ejected (passive health): when the backend is tried again, ISO 8601. */
  ejectedUntil?: string;
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
