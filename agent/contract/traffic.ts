import type { BalancePolicy, LimitsSpec, OutlierSpec } from './balancer-config.js';

/**
 * The per-service traffic document in Consul KV at `<kv-prefix>/traffic/NAME` (NAME: the service's
 * name in Consul), written by operators with `consul kv put`. Times are in seconds there; parsed into
 * the milliseconds of balancer.json. An empty or missing document means no split and the defaults.
 *
 *   {"split": [{"tag": "canary", "weight": 20}],
 *    "policy": "least-conn",
 *    "limits": {"maxConnections": 200, "queue": 50, "queueTimeout": 5, "connectTimeout": 1,
 *               "idleTimeout": 600, "drain": "drain", "drainTimeout": 30},
 *    "outlier": {"consecutiveFailures": 3, "baseEjection": 5, "maxEjection": 60,
 *                "maxEjectedPercent": 50, "panicThresholdPercent": 50}}
 */
export interface TrafficDoc {
  /** Tag -> percent of new connections; the rest (100 - sum) goes to instances with none of the tags. */
  split: { tag: string; weight: number }[];
  policy?: BalancePolicy;
  limits: LimitsSpec;
  outlier: OutlierSpec;
}

export const emptyTrafficDoc: TrafficDoc = { split: [], limits: {}, outlier: {} };
