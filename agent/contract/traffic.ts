import { balancePolicies, drainPolicies, type BalancePolicy, type LimitsSpec, type OutlierSpec } from './balancer-config.js';
import { describe, expectArray, expectInteger, expectOneOf, expectRecord, expectString } from '../validate.js';

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

/** Longest time a document may set, in seconds (a day): generous, and still catches ms typed as s. */
export const maxTrafficSeconds = 86_400;
/** Longest split tag (Consul tags have no limit of their own; a longer one is a mistake). */
export const maxTagLength = 255;
/** Most subsets a split may have: every new connection looks at each, so thousands would cost on the hot path. */
export const maxSplitParts = 32;

const controlCharacter = /[\u0000-\u001f\u007f]/;

const topKeys = ['split', 'policy', 'limits', 'outlier'] as const;
const splitKeys = ['tag', 'weight'] as const;
const limitKeys = ['maxConnections', 'queue', 'queueTimeout', 'connectTimeout', 'idleTimeout', 'drain', 'drainTimeout'] as const;
const outlierKeys = ['consecutiveFailures', 'baseEjection', 'maxEjection', 'maxEjectedPercent', 'panicThresholdPercent'] as const;

/** A key not in `known` is a typo that would otherwise silently do nothing ("splt"): refused. */
function onlyKnownKeys(raw: Record<string, unknown>, where: string, known: readonly string[]): void {
  for (const key of Object.keys(raw)) {
    if (!known.includes(key)) throw new TypeError(`${where}: unknown key ${describe(key)}; expected only ${known.join(', ')}`);
  }
}

/** Seconds (fractions allowed) -> whole milliseconds; `zero` allows 0 (drainTimeout: cut at once). */
function seconds(value: unknown, where: string, zero: boolean): number {
  const min = zero ? 0 : 0.001;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > maxTrafficSeconds) {
    throw new TypeError(`${where}: expected a number of seconds from ${min} to ${maxTrafficSeconds}${zero ? '' : ' (fractions allowed, more than 0)'}, got ${describe(value)}`);
  }
  return Math.round(value * 1000);
}

function withoutUndefined<T extends object>(value: T): T {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as T;
}

function parseSplitPart(value: unknown, where: string): { tag: string; weight: number } {
  const raw = expectRecord(value, where);
  onlyKnownKeys(raw, where, splitKeys);
  const tag = expectString(raw.tag, `${where}.tag`);
  if (tag.length === 0 || tag.length > maxTagLength || controlCharacter.test(tag)) {
    throw new TypeError(`${where}.tag: expected a Consul tag (1 to ${maxTagLength} characters, no control characters), got ${describe(tag)}`);
  }
  return { tag, weight: expectInteger(raw.weight, `${where}.weight`, 0, 100) };
}

function parseSplit(value: unknown, where: string): TrafficDoc['split'] {
  const list = expectArray(value, where);
  if (list.length > maxSplitParts) throw new TypeError(`${where}: ${list.length} entries; expected at most ${maxSplitParts} tags`);
  const parts = list.map((v, i) => parseSplitPart(v, `${where}[${i}]`));
  const seen = new Set<string>();
  for (const p of parts) {
    if (seen.has(p.tag)) throw new TypeError(`${where}: the tag ${describe(p.tag)} is there twice; expected each tag once`);
    seen.add(p.tag);
  }
  const total = parts.reduce((sum, p) => sum + p.weight, 0);
  if (total > 100) {
    throw new TypeError(`${where}: the weights add up to ${total} (${parts.map((p) => `${p.tag} ${p.weight}`).join(' + ')}); expected at most 100 (the rest goes to instances with none of the tags)`);
  }
  return parts;
}

function parseTrafficLimits(value: unknown, where: string): LimitsSpec {
  const raw = expectRecord(value, where);
  onlyKnownKeys(raw, where, limitKeys);
  const count = (key: string, min: number, max: number): number | undefined => (raw[key] === undefined ? undefined : expectInteger(raw[key], `${where}.${key}`, min, max));
  const time = (key: string, zero = false): number | undefined => (raw[key] === undefined ? undefined : seconds(raw[key], `${where}.${key}`, zero));
  return withoutUndefined({
    connectTimeoutMs: time('connectTimeout'),
    idleTimeoutMs: time('idleTimeout'),
    maxConnections: count('maxConnections', 0, 1_000_000),
    queue: count('queue', 0, 1_000_000),
    queueTimeoutMs: time('queueTimeout'),
    drain: raw.drain === undefined ? undefined : expectOneOf(raw.drain, `${where}.drain`, drainPolicies),
    drainTimeoutMs: time('drainTimeout', true),
  });
}

function parseTrafficOutlier(value: unknown, where: string): OutlierSpec {
  const raw = expectRecord(value, where);
  onlyKnownKeys(raw, where, outlierKeys);
  const count = (key: string, min: number, max: number): number | undefined => (raw[key] === undefined ? undefined : expectInteger(raw[key], `${where}.${key}`, min, max));
  const time = (key: string): number | undefined => (raw[key] === undefined ? undefined : seconds(raw[key], `${where}.${key}`, false));
  const outlier: OutlierSpec = withoutUndefined({
    consecutiveFailures: count('consecutiveFailures', 1, 1000),
    baseEjectionMs: time('baseEjection'),
    maxEjectionMs: time('maxEjection'),
    maxEjectedPercent: count('maxEjectedPercent', 0, 100),
    panicThresholdPercent: count('panicThresholdPercent', 0, 100),
  });
  if (outlier.baseEjectionMs !== undefined && outlier.maxEjectionMs !== undefined && outlier.maxEjectionMs < outlier.baseEjectionMs) {
    throw new TypeError(`${where}.maxEjection: expected at least baseEjection (${raw.baseEjection as number} s), got ${describe(raw.maxEjection)}`);
  }
  return outlier;
}

/**
 * A traffic document's text (the KV value) -> TrafficDoc. Empty text (or only whitespace) and `{}`
 * are the empty document. Anything else wrong, an unknown key included, throws a TypeError whose
 * message starts with `where` and names the bad value and what was expected.
 */
export function parseTrafficDoc(text: string, where: string): TrafficDoc {
  if (text.trim() === '') return { split: [], limits: {}, outlier: {} };
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    throw new TypeError(`${where}: expected a JSON object like {"split":[{"tag":"canary","weight":20}]}, got ${describe(text)}, which is not valid JSON (${(cause as Error).message})`, { cause });
  }
  const raw = expectRecord(json, where);
  onlyKnownKeys(raw, where, topKeys);
  const doc: TrafficDoc = {
    split: raw.split === undefined ? [] : parseSplit(raw.split, `${where}: split`),
    limits: raw.limits === undefined ? {} : parseTrafficLimits(raw.limits, `${where}: limits`),
    outlier: raw.outlier === undefined ? {} : parseTrafficOutlier(raw.outlier, `${where}: outlier`),
  };
  if (raw.policy !== undefined) doc.policy = expectOneOf(raw.policy, `${where}: policy`, balancePolicies);
  return doc;
}
