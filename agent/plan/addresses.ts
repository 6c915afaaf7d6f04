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

export function inRange(range: AddressRange, address: string): boolean {
  if (!isIPv4(address)) return false;
  const n = ipv4ToInt(address);
  return n >= range.first && n <= range.last;
}

/** Service label -> address. */
export type AddressTable = Readonly<Record<string, string>>;

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
    if (table[name] !== undefined) continue;
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
