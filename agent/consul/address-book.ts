import type { Logger } from '../log.js';
import { ConsulError, codes, errorCode, errorMessage } from '../errors.js';
import { readFileIfExists, writeFileAtomic } from '../fs/atomic-write.js';
import { allocate, type AddressRange, type AddressTable } from '../plan/addresses.js';
import { describe, isIPv4, isRecord } from '../validate.js';
import type { ConsulClient } from './client.js';

/** The KV document: one key, so a whole allocation round is one check-and-set. */
interface AddressDocument {
  version: 1;
  addresses: Record<string, string>;
}

export function parseAddressDocument(text: string, where: string): AddressDocument {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new TypeError(`${where}: expected JSON like {"version":1,"addresses":{"web":"127.77.0.1"}}, got ${describe(text)}`);
  }
  if (!isRecord(json) || json.version !== 1 || !isRecord(json.addresses)) {
    throw new TypeError(`${where}: expected {"version":1,"addresses":{...}}, got ${describe(json)}`);
  }
  const addresses: Record<string, string> = {};
  for (const [name, address] of Object.entries(json.addresses)) {
    if (typeof address !== 'string' || !isIPv4(address)) throw new TypeError(`${where}: address of "${name}": expected an IPv4 address, got ${describe(address)}`);
    addresses[name] = address;
  }
  return { version: 1, addresses };
}

export interface AddressBookOptions {
  client: ConsulClient;
  logger: Logger;
  /** KV key holding the table, e.g. loopmesh/addresses. */
  key: string;
  range: AddressRange;
  /** Local copy, so a restart while Consul is down keeps every address. */
  cacheFile: string;
}

/**
 * Stable addresses: a service's address is allocated once, cluster-wide, in Consul KV with
 * check-and-set, and never changes after. Every node reads the same table.
 */
export class AddressBook {
  private current: Record<string, string> = {};

  constructor(private readonly options: AddressBookOptions) {}

  async load(): Promise<void> {
    const text = await readFileIfExists(this.options.cacheFile);
    if (text === undefined) return;
    try {
      this.current = parseAddressDocument(text, this.options.cacheFile).addresses;
    } catch (err) {
      this.options.logger.warn({ code: codes.consulInvalidData, file: this.options.cacheFile }, `ignoring the address cache: ${errorMessage(err)}`);
    }
  }

  table(): AddressTable {
    return this.current;
  }

  /**
   * Makes sure every label has an address. Never throws: when Consul cannot be reached the known
   * addresses stay and the missing names are returned, to be tried again on the next change.
   */
  async ensure(labels: readonly string[]): Promise<{ table: AddressTable; missing: string[] }> {
    const missingNow = (): string[] => labels.filter((l) => this.current[l] === undefined);
    if (missingNow().length === 0) return { table: this.current, missing: [] };
    const { client, key, range, logger } = this.options;
    try {
      for (let attempt = 1; attempt <= 8; attempt += 1) {
        const result = await client.kvGet(key);
        const item = isRecord(result.body) ? result.body : undefined;
        const remote = item && typeof item.Value === 'string' ? parseAddressDocument(item.Value, `Consul KV ${key}`).addresses : {};
        const modifyIndex = item && typeof item.ModifyIndex === 'number' ? BigInt(item.ModifyIndex) : 0n;
        // The cluster's table wins over anything only this node remembers.
        this.current = { ...this.current, ...remote };
        const needed = missingNow();
        if (needed.length === 0) break;
        const { table, exhausted } = allocate(remote, needed, range);
        if (exhausted.length > 0) {
          logger.error({ code: codes.planAddressesExhausted, range: range.cidr, services: exhausted }, `address range ${range.cidr} is full; widen --range`);
        }
        const doc: AddressDocument = { version: 1, addresses: table };
        if (await client.kvCas(key, JSON.stringify(doc, null, 1), modifyIndex)) {
          this.current = { ...this.current, ...table };
          logger.info({ allocated: Object.fromEntries(needed.filter((n) => table[n]).map((n) => [n, table[n]])) }, 'allocated addresses');
          break;
        }
        // Another node wrote first: read its table and try again.
        logger.debug({ code: codes.consulCasConflict, key, attempt }, 'address allocation raced another node; retrying');
      }
    } catch (err) {
      const error = err instanceof ConsulError ? err : new ConsulError(codes.consulInvalidData, errorMessage(err), { cause: err });
      logger.warn({ code: errorCode(error), key }, `cannot allocate addresses now: ${error.message}`);
    }
    await this.save();
    return { table: this.current, missing: missingNow() };
  }

  /** For a dry run: the cluster's table plus what would be allocated, writing nothing anywhere. */
  async preview(labels: readonly string[]): Promise<AddressTable> {
    const result = await this.options.client.kvGet(this.options.key);
    const item = isRecord(result.body) ? result.body : undefined;
    const remote = item && typeof item.Value === 'string' ? parseAddressDocument(item.Value, `Consul KV ${this.options.key}`).addresses : {};
    const known = { ...this.current, ...remote };
    return allocate(known, labels.filter((l) => known[l] === undefined), this.options.range).table;
  }

  private async save(): Promise<void> {
    const doc: AddressDocument = { version: 1, addresses: this.current };
    try {
      await writeFileAtomic(this.options.cacheFile, `${JSON.stringify(doc, null, 1)}\n`);
    } catch (err) {
      this.options.logger.warn({ code: errorCode(err), file: this.options.cacheFile }, `cannot write the address cache: ${errorMessage(err)}`);
    }
  }
}
