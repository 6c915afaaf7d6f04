import { codes, type Problem } from '../errors.js';
import { intToIPv4, ipv4ToInt, isIPv4 } from '../validate.js';

export interface AddressRange {
  cidr: string;
  first: number;
  last: number;
}

/** Loopback addresses other software already owns (systemd-resolved, Debian's hostname line). */
export const reservedAddresses: readonly string[] = ['127.0.0.1', '127.0.0.53', '127.0.0.54', '127.0.1.1'];

/** "127.77.0.0/16" -> the usable host addresses in it (network and broadcast left out). */
export function parseRange(cidr: string): AddressRange {
  const match = /^(\d+\.\d+\.\d+\.\d+)\/(\d{1,2})$/.exec(cidr);
  const prefix = match ? Number(match[2]) : NaN;
  if (!match || !match[1] || !isIPv4(match[1]) || !(prefix >= 8 && prefix <= 30)) {
    throw new TypeError(`expected a CIDR range inside 127.0.0.0/8 with a prefix from /8 to /30 (for example 127.77.0.0/16), got "${cidr}"`);
  }
  const size = 2 ** (32 - prefix);
  const base = ipv4ToInt(match[1]) - (ipv4ToInt(match[1]) % size);
  if (base >>> 24 !== 127) throw new TypeError(`expected a CIDR range inside 127.0.0.0/8 (Linux routes all of it to lo), got "${cidr}"`);
  return { cidr, first: base + 1, last: base + size - 2 };
}

/**
 * A gateway's range (--gateway-range): addresses reachable from the other nodes on which a
 * `loopmesh gateway` serves every service. Not loopback, multicast, 0/8 or the broadcast address;
 * its first and last address are left out as in a range of 127/8.
 */
export function parseGatewayRange(cidr: string): AddressRange {
  const match = /^(\d+\.\d+\.\d+\.\d+)\/(\d{1,2})$/.exec(cidr);
  const prefix = match ? Number(match[2]) : NaN;
  if (!match || !match[1] || !isIPv4(match[1]) || !(prefix >= 8 && prefix <= 30)) {
    throw new TypeError(`expected an IPv4 CIDR range with a prefix from /8 to /30 (for example 10.77.77.128/27), got "${cidr}"`);
  }
  const size = 2 ** (32 - prefix);
  const base = ipv4ToInt(match[1]) - (ipv4ToInt(match[1]) % size);
  const first = base >>> 24;
  if (first === 127 || first === 0 || first >= 224) {
    throw new TypeError(`expected a range of unicast addresses other nodes can reach (not 0/8, 127/8, multicast or reserved), got "${cidr}"`);
  }
  return { cidr: `${intToIPv4(base)}/${prefix}`, first: base + 1, last: base + size - 2 };
}

/**
 * The address in `to` that mirrors `address` of `from`: the same offset from the first address.
 * A gateway serves the service of 127.77.0.5 (offset 4 in 127.77.0.0/16) at 10.77.77.133 with
 * --gateway-range 10.77.77.128/27. undefined when the offset is past the end of `to`.
 */
export function mirrorAddress(from: AddressRange, to: AddressRange, address: string): string | undefined {
  if (!inRange(from, address)) return undefined;
  const n = to.first + (ipv4ToInt(address) - from.first);
  return n <= to.last ? intToIPv4(n) : undefined;
}

export function inRange(range: AddressRange, address: string): boolean {
  if (!isIPv4(address)) return false;
  const n = ipv4ToInt(address);
  return n >= range.first && n <= range.last;
}

/** Service label -> address. */
export type AddressTable = Readonly<Record<string, string>>;

/**
 * The table's entry for a label, own properties only: a service called "constructor" or "toString"
 * must not find Object.prototype's function there (it got no address, and its route an address that
 * is a function, which broke balancer.json for every service).
 */
export function addressOf<T>(table: Readonly<Record<string, T>>, label: string): T | undefined {
  return Object.hasOwn(table, label) ? table[label] : undefined;
}

/**
 * Gives each name without an address the lowest free one in the range, in name order, so that two
 * nodes racing to allocate compute the same answer. Returns the new table and the names that did
 * not fit.
 */
export function allocate(existing: AddressTable, names: readonly string[], range: AddressRange): { table: Record<string, string>; exhausted: string[] } {
  const table: Record<string, string> = { ...existing };
  const used = new Set(Object.values(table));
  for (const r of reservedAddresses) used.add(r);
  const exhausted: string[] = [];
  let cursor = range.first;
  for (const name of [...names].sort()) {
    if (addressOf(table, name) !== undefined) continue;
    while (cursor <= range.last && used.has(intToIPv4(cursor))) cursor += 1;
    if (cursor > range.last) {
      exhausted.push(name);
      continue;
    }
    const address = intToIPv4(cursor);
    table[name] = address;
    used.add(address);
  }
  return { table, exhausted };
}


/**
 * What an address in the table is to this node: usable, valid for loopmesh but outside this node's
 * --range (another node's setting: left alone, never fought over), or invalid anywhere.
 */
export function classifyAddress(range: AddressRange, address: unknown): { kind: 'ok' } | { kind: 'foreign' | 'invalid'; reason: string } {
  if (typeof address !== 'string' || !isIPv4(address)) return { kind: 'invalid', reason: `expected an IPv4 address inside ${range.cidr}, got ${JSON.stringify(address)}` };
  const n = ipv4ToInt(address);
  if (n >>> 24 !== 127 || (n & 0xffffff) === 0 || (n & 0xffffff) === 0xffffff) {
    return { kind: 'invalid', reason: `expected a loopback address inside ${range.cidr}, got "${address}" (it would be bound and published as it is)` };
  }
  if (reservedAddresses.includes(address)) return { kind: 'invalid', reason: `expected an address other software does not own (not ${reservedAddresses.join(', ')}), got "${address}"` };
  if (!inRange(range, address)) return { kind: 'foreign', reason: `expected an address inside this node's --range ${range.cidr}, got "${address}"; every node needs the same --range` };
  return { kind: 'ok' };
}

export interface ReconcileInput {
  /** The cluster's table as read from KV. */
  remote: Readonly<Record<string, unknown>>;
  /** What this node holds (its cache and the table it serves). */
  local: Readonly<Record<string, unknown>>;
  /** Labels that need an address now. */
  wanted: readonly string[];
  range: AddressRange;
}

export interface ReconcileResult {
  /** What this node serves: valid, unique, every wanted label that fits. */
  table: Record<string, string>;
  /** What KV should hold: `table` plus entries of other ranges, left as they are. */
  document: Record<string, string>;
  /** True when `document` differs from what KV holds: write it back with check-and-set. */
  changed: boolean;
  /** Entries not taken (invalid, duplicate) and services with no room: reported, never frozen on. */
  problems: Problem[];
  exhausted: string[];
}

/**
 * Cluster table + this node's table -> one table with no address given twice. KV wins; an entry
 * only this node remembers (KV lost or rolled back) is restored unless KV gave its address to
 * another service meanwhile; invalid or duplicate entries are dropped (duplicates: the first label
 * in name order keeps the address, the same choice on every node) and their services allocated anew.
 */
export function reconcileAddresses(input: ReconcileInput): ReconcileResult {
  const { range } = input;
  const problems: Problem[] = [];
  const table: Record<string, string> = {};
  const foreign: Record<string, string> = {};
  const owner = new Map<string, string>();
  let changed = false;
  const take = (label: string, address: unknown, source: string): boolean => {
    const verdict = classifyAddress(range, address);
    if (verdict.kind === 'foreign' && source === 'Consul KV') {
      problems.push({ service: label, code: codes.planAddressInvalid, message: `${source} address of "${label}": ${verdict.reason}; not served on this node` });
      foreign[label] = address as string;
      return true;
    }
    if (verdict.kind !== 'ok') {
      problems.push({ service: label, code: codes.planAddressInvalid, message: `${source} address of "${label}": ${verdict.reason}; a new one is allocated` });
      return false;
    }
    const other = owner.get(address as string);
    if (other !== undefined) {
      problems.push({ service: label, code: codes.planAddressConflict, message: `${source} gives "${label}" the address ${String(address)}, which "${other}" has; "${label}" gets a new one` });
      return false;
    }
    owner.set(address as string, label);
    table[label] = address as string;
    return true;
  };
  for (const label of Object.keys(input.remote).sort()) {
    if (!take(label, addressOf(input.remote, label), 'Consul KV')) changed = true;
  }
  for (const label of Object.keys(input.local).sort()) {
    if (addressOf(table, label) !== undefined || addressOf(foreign, label) !== undefined) continue;
    // KV lost this entry, or holds a bad one: put back what this node served, so the service keeps
    // its address.
    if (take(label, addressOf(input.local, label), 'the local address cache')) changed = true;
  }
  const needed = input.wanted.filter((label) => addressOf(table, label) === undefined && addressOf(foreign, label) === undefined);
  const { table: allocated, exhausted } = allocate(table, needed, range);
  if (needed.length > exhausted.length) changed = true;
  for (const label of exhausted) {
    problems.push({ service: label, code: codes.planAddressesExhausted, message: `service "${label}" gets no address: the range ${range.cidr} is full; widen --range` });
  }
  return { table: allocated, document: { ...foreign, ...allocated }, changed, problems, exhausted };
}
