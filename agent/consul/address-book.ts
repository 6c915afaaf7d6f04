import type { Logger } from '../log.js';
import { ConsulError, codes, errorCode, errorMessage, type Problem } from '../errors.js';
import { writeFileAtomic } from '../fs/atomic-write.js';
import { readRunDirFileIfExists } from '../fs/run-dir.js';
import { addressOf, reconcileAddresses, type AddressRange, type AddressTable } from '../plan/addresses.js';
import { describe, isRecord } from '../validate.js';
import { BlockingQuery } from './blocking-query.js';
import { isHttpStatus, type ConsulClient, type QueryResult } from './client.js';

/** The KV document: one key, so a whole allocation round is one check-and-set. */
interface AddressDocument {
  version: 1;
  addresses: Record<string, string>;
}

/**
 * The document's shape only; its entries stay unknown until reconcileAddresses checks each of them,
 * so one bad entry costs one service its address, not the whole table.
 */
export function parseAddressDocument(text: string, where: string): Record<string, unknown> {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new TypeError(`${where}: expected JSON like {"version":1,"addresses":{"web":"127.77.0.1"}}, got ${describe(text)}`);
  }
  if (!isRecord(json) || json.version !== 1 || !isRecord(json.addresses)) {
    throw new TypeError(`${where}: expected {"version":1,"addresses":{...}}, got ${describe(json)}`);
  }
  return { ...json.addresses };
}

/** What KV holds now: the table (empty when the key is missing) and the index to check-and-set on. */
interface RemoteTable {
  addresses: Record<string, unknown>;
  modifyIndex: bigint;
  /** Why the key's value was not a table: it is replaced on the next write. */
  invalid?: string;
}

function remoteFrom(result: QueryResult, key: string): RemoteTable {
  const item = isRecord(result.body) ? result.body : undefined;
  if (item === undefined) return { addresses: {}, modifyIndex: 0n };
  const modifyIndex = typeof item.ModifyIndex === 'number' && Number.isInteger(item.ModifyIndex) ? BigInt(item.ModifyIndex) : 0n;
  try {
    return { addresses: parseAddressDocument(typeof item.Value === 'string' ? item.Value : '', `Consul KV ${key}`), modifyIndex };
  } catch (err) {
    return { addresses: {}, modifyIndex, invalid: errorMessage(err) };
  }
}

export interface AddressBookOptions {
  client: ConsulClient;
  logger: Logger;
  /** KV key holding the table, e.g. loopmesh/addresses. */
  key: string;
  range: AddressRange;
  /** Local copy, so a restart while Consul is down keeps every address. */
  cacheFile: string;
  /** How long one blocking read of the key waits (--consul-wait). */
  waitMs?: number;
  /** Called when KV changed under us (an edit, a restore, a lost key): the agent plans again. */
  onRemoteChange?: () => void;
}

/**
 * Stable addresses: a service's address is allocated once, cluster-wide, in Consul KV with
 * check-and-set. The node's table and KV are reconciled on start, on every change of either, so an
 * address is never given to two services, and a lost or rolled-back KV table is repaired from what
 * the nodes hold.
 */
export class AddressBook {
  private current: Record<string, string> = {};
  private remote: RemoteTable | undefined;
  private problemsValue: Problem[] = [];
  /** Why the last reconcile could not read or write the table in KV; cleared by one that could. */
  private kvProblem: Problem | undefined;
  private readonly watch: BlockingQuery;
  private readonly reported = new Set<string>();
  /** The last reconcile that changed nothing: its KV table, the table it left, the labels KV gives another range. */
  private settled: { remote: RemoteTable; table: Record<string, string>; foreign: Set<string> } | undefined;
  /** The cache writes, one after another (the last one holds the newest table). */
  private saving: Promise<void> = Promise.resolve();
  private savePending = false;

  constructor(private readonly options: AddressBookOptions) {
    this.watch = new BlockingQuery({
      name: `kv/${options.key}`,
      logger: options.logger,
      minIntervalMs: 250,
      fetch: (index, signal) => options.client.kvGet(options.key, { index, signal, ...(options.waitMs !== undefined ? { waitMs: options.waitMs } : {}) }),
      onChange: (result) => {
        const remote = remoteFrom(result, options.key);
        this.remote = remote;
        // The echo of this node's own write (the table it holds, entry for entry) changes nothing:
        // planning again for it cost a whole reconcile right after every new service.
        if (remote.invalid === undefined && sameTable(remote.addresses, this.current)) return;
        options.onRemoteChange?.();
      },
    });
  }

  /** Reads the local cache, keeping only entries that are valid and unique. */
  async load(): Promise<void> {
    const { cacheFile, logger, range } = this.options;
    let text: string | undefined;
    try {
      text = await readRunDirFileIfExists(cacheFile);
    } catch (err) {
      logger.warn({ code: errorCode(err), file: cacheFile }, `cannot read the address cache: ${errorMessage(err)}`);
    }
    if (text === undefined) return;
    try {
      const cached = parseAddressDocument(text, cacheFile);
      const checked = reconcileAddresses({ remote: {}, local: cached, wanted: [], range });
      this.current = checked.table;
      this.report(checked.problems);
    } catch (err) {
      logger.warn({ code: codes.consulInvalidData, file: cacheFile }, `ignoring the address cache: ${errorMessage(err)}`);
    }
  }

  /** Follows the KV key, so an edit or a restore there is reconciled at once. */
  start(): void {
    this.watch.start();
  }

  async stop(): Promise<void> {
    await this.watch.stop();
    await this.saving;
  }

  /** Writes the cache after the writes already queued; each write takes the table as it is by then. */
  private saveSoon(): void {
    if (this.savePending) return;
    this.savePending = true;
    this.saving = this.saving.then(async () => {
      this.savePending = false;
      const table = this.current;
      if (!(await this.save())) {
        if (this.settled?.table === table) this.settled = undefined;
      }
    });
  }

  table(): AddressTable {
    return this.current;
  }

  /** Entries refused or moved by the last reconcile (invalid, duplicate, range full), and why KV could not be used. */
  problems(): readonly Problem[] {
    return this.kvProblem ? [...this.problemsValue, this.kvProblem] : this.problemsValue;
  }

  /**
   * Reconciles the node's table with KV and gives every label an address. Never throws: when Consul
   * cannot be reached the known addresses stay and the missing names are returned, to be tried
   * again on the next change.
   */
  async ensure(labels: readonly string[]): Promise<{ table: AddressTable; missing: string[] }> {
    const missingNow = (): string[] => labels.filter((l) => addressOf(this.current, l) === undefined);
    const { client, key, range, logger } = this.options;
    // Nothing moved since the last reconcile that changed nothing (the same KV table, this node's
    // table as it left it) and every label has its address: that reconcile's answer stands.
    const settled = this.settled;
    if (settled && settled.remote === this.remote && settled.table === this.current && labels.every((l) => addressOf(this.current, l) !== undefined || settled.foreign.has(l))) {
      return { table: this.current, missing: [] };
    }
    this.settled = undefined;
    try {
      for (let attempt = 1; attempt <= 8; attempt += 1) {
        const remote = this.remote ?? (await this.read());
        const result = reconcileAddresses({ remote: remote.addresses, local: this.current, wanted: labels, range });
        // A key holding no table at all (an operator's edit) is rewritten from this node's table.
        if (remote.invalid !== undefined) {
          result.problems.unshift({ code: codes.consulInvalidData, message: `${remote.invalid}; rewritten from this node's table` });
          result.changed = true;
        }
        this.problemsValue = result.problems;
        this.report(result.problems);
        if (!result.changed) {
          this.kvProblem = undefined;
          this.current = result.table;
          this.settled = { remote, table: result.table, foreign: new Set(Object.keys(result.document).filter((l) => addressOf(result.table, l) === undefined)) };
          break;
        }
        const doc: AddressDocument = { version: 1, addresses: sortedRecord(result.document) };
        if (await client.kvCas(key, JSON.stringify(doc, null, 1), remote.modifyIndex)) {
          const added = Object.entries(result.table).filter(([label, address]) => addressOf(this.current, label) !== address);
          this.kvProblem = undefined;
          this.current = result.table;
          // The write's own index is not returned: read it, so the next check-and-set is based on it.
          this.remote = undefined;
          if (added.length > 0) logger.info({ allocated: Object.fromEntries(added) }, 'addresses written to Consul KV');
          break;
        }
        // Another node wrote first: read its table and try again.
        this.remote = undefined;
        logger.debug({ code: codes.consulCasConflict, key, attempt }, 'address table changed in KV meanwhile; reconciling again');
      }
    } catch (err) {
      const error = err instanceof ConsulError ? err : new ConsulError(codes.consulInvalidData, errorMessage(err), { cause: err });
      logger.warn({ code: errorCode(error), key }, `cannot reconcile addresses with Consul KV now: ${error.message}`);
      // The whole table is one KV value (one check-and-set per round): past Consul's value size limit
      // no new service gets an address, while every service that has one keeps it.
      const tooLarge = isHttpStatus(error, 413);
      const missing = labels.filter((l) => addressOf(this.current, l) === undefined).length;
      this.kvProblem = {
        code: codes.addressTableWrite,
        message: `the address table (Consul KV ${JSON.stringify(key)}) cannot be updated, ${missing} service(s) wait for an address: ${error.message.replace(/\.$/, '')}${tooLarge ? `; the table is one KV value and has outgrown Consul's limit: raise limits { kv_max_value_size } on the Consul servers and agents, or route fewer services (--services, --services-kv, --tag)` : ''}`,
      };
    }
    // The cache is written beside the change, not before it is served (at 2,000 services its write
    // was 10-15 ms of every new service's time); a cache not written is tried again on the next change.
    this.saveSoon();
    return { table: this.current, missing: missingNow() };
  }

  /** For a dry run: the reconciled table plus what would be allocated, writing nothing anywhere. */
  async preview(labels: readonly string[]): Promise<AddressTable> {
    const remote = await this.read();
    return reconcileAddresses({ remote: remote.addresses, local: this.current, wanted: labels, range: this.options.range }).table;
  }

  private async read(): Promise<RemoteTable> {
    // From the leader: a follower behind it would show a table without our last write, and the
    // check-and-set based on it would fail (or the repair would repeat) until it caught up.
    const table = remoteFrom(await this.options.client.kvGet(this.options.key, { stale: false }), this.options.key);
    this.remote = table;
    return table;
  }

  /** Each problem is logged once while it lasts. */
  private report(problems: readonly Problem[]): void {
    const now = new Set(problems.map((p) => `${p.code}:${p.message}`));
    for (const p of problems) {
      const key = `${p.code}:${p.message}`;
      if (this.reported.has(key)) continue;
      this.options.logger.warn({ code: p.code, service: p.service }, p.message);
    }
    this.reported.clear();
    for (const key of now) this.reported.add(key);
  }

  private async save(): Promise<boolean> {
    const doc: AddressDocument = { version: 1, addresses: sortedRecord(this.current) };
    try {
      await writeFileAtomic(this.options.cacheFile, `${JSON.stringify(doc, null, 1)}\n`);
      return true;
    } catch (err) {
      this.options.logger.warn({ code: errorCode(err), file: this.options.cacheFile }, `cannot write the address cache: ${errorMessage(err)}`);
      return false;
    }
  }
}

function sameTable(remote: Record<string, unknown>, local: Readonly<Record<string, string>>): boolean {
  const keys = Object.keys(remote);
  return keys.length === Object.keys(local).length && keys.every((k) => remote[k] === local[k]);
}

function sortedRecord(record: Readonly<Record<string, string>>): Record<string, string> {
  return Object.fromEntries(Object.entries(record).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}
