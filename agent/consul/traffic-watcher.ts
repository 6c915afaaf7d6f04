import type { Logger } from '../log.js';
import { parseTrafficDoc, type TrafficDoc } from '../contract/traffic.js';
import { ConsulError, codes, errorCode, errorMessage, type Problem } from '../errors.js';
import { dnsLabel } from '../plan/names.js';
import { describe, isRecord } from '../validate.js';
import { BlockingQuery } from './blocking-query.js';
import type { ConsulClient, QueryResult } from './client.js';

/** The reads the watcher makes: a ConsulClient. */
export type TrafficReader = Pick<ConsulClient, 'url' | 'kvList'>;

export interface TrafficWatcherOptions {
  client: TrafficReader;
  logger: Logger;
  /** The KV prefix the documents live under, e.g. "loopmesh/traffic" (one key per service below it). */
  prefix: string;
  /** Called when the documents in force changed (a doc added, changed or removed): plan again. */
  onChange: () => void;
  /** How long one blocking read waits (--consul-wait). */
  waitMs?: number;
  minIntervalMs?: number;
  backoffBaseMs?: number;
}

/** One entry of /v1/kv/PREFIX?recurse as the client returns it (Value decoded from base64). */
export interface KvEntry {
  key: string;
  value: string;
}

/** The answer's shape only: an array of {Key: string, Value: string | null}; 404 (no body) is no keys. */
export function parseKvList(body: unknown, where: string): KvEntry[] {
  if (body === undefined || body === null) return [];
  if (!Array.isArray(body)) throw new ConsulError(codes.consulInvalidData, `${where}: expected an array of KV entries, got ${describe(body)}`);
  return body.map((item, i) => {
    if (!isRecord(item) || typeof item.Key !== 'string') throw new ConsulError(codes.consulInvalidData, `${where}[${i}]: expected a KV entry with a string Key, got ${describe(item)}`);
    const value = item.Value;
    if (value !== undefined && value !== null && typeof value !== 'string') {
      throw new ConsulError(codes.consulInvalidData, `${where}[${i}] (${item.Key}): expected a string Value, got ${describe(value)}`);
    }
    return { key: item.Key, value: value ?? '' };
  });
}

/** NAME of `<prefix>/NAME`, or why the key is not one document of one service. */
export function serviceOfKey(key: string, prefix: string): { ok: true; service: string } | { ok: false; reason: string } | undefined {
  const base = `${prefix}/`;
  if (!key.startsWith(base)) return { ok: false, reason: `is not under ${base}` };
  const name = key.slice(base.length);
  // The "folder" key itself (`consul kv put loopmesh/traffic/`): nothing to say about it.
  if (name === '') return undefined;
  if (name.includes('/')) return { ok: false, reason: `is nested; expected ${base}NAME with NAME a Consul service name` };
  const label = dnsLabel(name);
  if (!label.ok) return { ok: false, reason: `names ${describe(name)}, which cannot be a service loopmesh routes: it ${label.reason.startsWith('is ') ? label.reason : label.reason.replace(/^expected/, 'has characters outside the set; expected')}` };
  return { ok: true, service: name };
}

/**
 * The KV entries under the prefix -> service name -> document in force, and what is wrong. A bad
 * document keeps the service's document from `previous` (none there: no document).
 */
export function trafficDocs(entries: readonly KvEntry[], prefix: string, previous: ReadonlyMap<string, TrafficDoc>): { docs: Map<string, TrafficDoc>; problems: Problem[] } {
  const docs = new Map<string, TrafficDoc>();
  const problems: Problem[] = [];
  for (const entry of [...entries].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0))) {
    const owner = serviceOfKey(entry.key, prefix);
    if (owner === undefined) continue;
    if (!owner.ok) {
      problems.push({ code: codes.trafficInvalid, message: `Consul KV key ${describe(entry.key)} ${owner.reason}; ignored` });
      continue;
    }
    const service = owner.service;
    try {
      docs.set(service, parseTrafficDoc(entry.value, `Consul KV ${entry.key}`));
    } catch (err) {
      const kept = previous.get(service);
      if (kept) docs.set(service, kept);
      problems.push({
        service,
        code: codes.trafficInvalid,
        message: `${errorMessage(err)}; ${kept ? 'the previous document stays in force' : 'no document in force for this service'}`,
      });
    }
  }
  return { docs, problems };
}

/** One plain read of every document (for a one-shot command such as `loopmesh render`); throws when KV cannot be read. */
export async function readTrafficDocs(client: TrafficReader, prefix: string): Promise<{ docs: Map<string, TrafficDoc>; problems: Problem[] }> {
  const base = prefix.replace(/\/+$/, '');
  const result = await client.kvList(`${base}/`);
  return trafficDocs(parseKvList(result.body, `Consul KV ${base}/`), base, new Map());
}

/**
 * Follows `<kv-prefix>/traffic/` with one blocking query and keeps service name -> TrafficDoc.
 * A document that does not parse is reported (LM_ERR_TRAFFIC_INVALID) and the service keeps its
 * last good one; a deleted key is no document. When Consul cannot be read, the last documents stay
 * (fail static) and the read is retried with backoff.
 */
export class TrafficWatcher {
  private readonly query: BlockingQuery;
  private docsValue = new Map<string, TrafficDoc>();
  /** Per key: why its document is not (or no longer) in force. */
  private keyProblems: Problem[] = [];
  private readError: Problem | undefined;
  private readonly reported = new Set<string>();
  private settledValue = false;
  private readonly prefix: string;

  constructor(private readonly options: TrafficWatcherOptions) {
    this.prefix = options.prefix.replace(/\/+$/, '');
    const waitMs = options.waitMs ?? 60_000;
    this.query = new BlockingQuery({
      name: `kv/${this.prefix}/`,
      logger: options.logger,
      minIntervalMs: options.minIntervalMs ?? 50,
      ...(options.backoffBaseMs !== undefined ? { backoffBaseMs: options.backoffBaseMs } : {}),
      fetch: (index, signal) => options.client.kvList(`${this.prefix}/`, { index, waitMs, signal }),
      onChange: (result) => this.changed(result),
      onError: (err) => this.failed(err),
      onRecover: () => {
        this.readError = undefined;
      },
    });
  }

  start(): void {
    this.query.start();
  }

  async stop(): Promise<void> {
    await this.query.stop();
  }

  /** Service name -> its document in force. */
  docs(): ReadonlyMap<string, TrafficDoc> {
    return this.docsValue;
  }

  /** True once KV has answered, or a read of it failed: until then a plan would miss the documents. */
  settled(): boolean {
    return this.settledValue;
  }

  /** Documents refused, keys ignored, and (while it lasts) why KV cannot be read. */
  problems(): Problem[] {
    return [...this.keyProblems, ...(this.readError ? [this.readError] : [])];
  }

  private changed(result: QueryResult): void {
    const entries = parseKvList(result.body, `Consul KV ${this.prefix}/`);
    const { docs: next, problems } = trafficDocs(entries, this.prefix, this.docsValue);
    const before = JSON.stringify([...this.docsValue].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    const after = JSON.stringify([...next].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    this.docsValue = next;
    this.keyProblems = problems;
    this.readError = undefined;
    this.report(problems);
    const first = !this.settledValue;
    this.settledValue = true;
    if (before !== after) this.options.logger.info({ services: [...next.keys()] }, 'traffic documents changed');
    if (before !== after || first) this.options.onChange();
  }

  private failed(err: unknown): void {
    const code = errorCode(err);
    this.readError = {
      code,
      message: `cannot read the traffic documents under ${this.prefix}/: ${errorMessage(err)}; ${this.docsValue.size > 0 ? 'the last ones read stay in force' : 'none in force'}`,
    };
    if (!this.settledValue) {
      // Plans go ahead without the documents rather than wait for a KV that may not answer (a 403).
      this.settledValue = true;
      this.options.onChange();
    }
  }

  /** Each problem is logged once while it lasts. */
  private report(problems: readonly Problem[]): void {
    const now = new Set(problems.map((p) => `${p.code}:${p.message}`));
    for (const p of problems) {
      if (this.reported.has(`${p.code}:${p.message}`)) continue;
      this.options.logger.warn({ code: p.code, service: p.service }, p.message);
    }
    this.reported.clear();
    for (const key of now) this.reported.add(key);
  }
}
