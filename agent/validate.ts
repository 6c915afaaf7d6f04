import { isIPv6 } from 'node:net';

/** Small checks that say what they expected and what they got, for every boundary. */
export type Issue = string;

export function describe(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return `an array`;
  if (typeof value === 'string') return JSON.stringify(value.length > 80 ? `${value.slice(0, 77)}...` : value);
  if (typeof value === 'object') return 'an object';
  return `${typeof value} ${String(value)}`;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export function expectString(value: unknown, where: string): string {
  if (typeof value !== 'string') throw new TypeError(`${where}: expected a string, got ${describe(value)}`);
  return value;
}

export function expectInteger(value: unknown, where: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new TypeError(`${where}: expected an integer from ${min} to ${max}, got ${describe(value)}`);
  }
  return value;
}

export function expectRecord(value: unknown, where: string): Record<string, unknown> {
  if (!isRecord(value)) throw new TypeError(`${where}: expected an object, got ${describe(value)}`);
  return value;
}

export function expectArray(value: unknown, where: string): unknown[] {
  if (!Array.isArray(value)) throw new TypeError(`${where}: expected an array, got ${describe(value)}`);
  return value;
}

export function expectOneOf<T extends string>(value: unknown, where: string, allowed: readonly T[]): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) {
    throw new TypeError(`${where}: expected one of ${allowed.join(', ')}, got ${describe(value)}`);
  }
  return value as T;
}

const ipv4Pattern = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

export function isIPv4(value: string): boolean {
  return ipv4Pattern.test(value);
}

export function ipv4ToInt(address: string): number {
  return address.split('.').reduce((acc, part) => acc * 256 + Number(part), 0);
}

export function intToIPv4(value: number): string {
  return [value >>> 24, (value >>> 16) & 255, (value >>> 8) & 255, value & 255].join('.');
}

/** "HOST:PORT" -> parts; the message names the bad value. */
export function parseHostPort(value: string, where: string): { host: string; port: number } {
  const match = /^(.+):(\d{1,5})$/.exec(value);
  const port = match ? Number(match[2]) : NaN;
  if (!match || !match[1] || port > 65535) {
    throw new TypeError(`${where}: expected ADDRESS:PORT (for example 127.0.0.1:8600), got ${describe(value)}`);
  }
  return { host: match[1].replace(/^\[(.*)\]$/, '$1'), port };
}

const hostLabel = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

/**
 * An address a backend may have: an IPv4 literal, an IPv6 literal without a zone (a zone names an
 * interface of one host), or an RFC 1123 host name (at most 253 characters, labels of 1 to 63
 * letters, digits and inner hyphens; an all-numeric last label is a mistyped IPv4 address, not a name).
 */
export function isHostAddress(value: string): boolean {
  if (isIPv4(value)) return true;
  if (value.includes(':')) return !value.includes('%') && isIPv6(value);
  if (value.length > 253) return false;
  const labels = value.split('.');
  return labels.every((label) => hostLabel.test(label)) && !/^\d+$/.test(labels[labels.length - 1] ?? '');
}
