import type { ServiceSpec } from '../contract/balancer-config.js';
import { isIPv4 } from '../validate.js';
import { isEncodableName } from './domain-name.js';

export interface ZoneRecord {
  address: string;
  port: number;
  service: string;
}

export interface Zone {
  /** The zone apex, lower case, no leading or trailing dot, e.g. "local". */
  suffix: string;
  ttl: number;
  /** fqdn (lower case, no trailing dot, e.g. web.local) -> where the service listens. */
  records: ReadonlyMap<string, ZoneRecord>;
}

/** What a (lower-case) query name is in a zone. */
export type ZoneMatch =
  | { kind: 'outside' }
  | { kind: 'apex' }
  | { kind: 'host'; fqdn: string; record: ZoneRecord }
  /** _NAME._tcp.SUFFIX: the SRV owner for NAME.SUFFIX. */
  | { kind: 'service'; fqdn: string; record: ZoneRecord }
  /** A name with no records of its own but names below it (RFC 8020): NODATA, not NXDOMAIN. */
  | { kind: 'empty' }
  | { kind: 'missing' };

export function normalizeName(name: string): string {
  return name.toLowerCase().replace(/^\.+|\.+$/g, '');
}

function isInside(name: string, suffix: string): boolean {
  if (suffix === '' || name === suffix) return true;
  if (!name.endsWith(`.${suffix}`)) return false;
  // "web\\.local" is one label holding a dot: an odd run of backslashes escapes the separator.
  let backslashes = 0;
  for (let i = name.length - suffix.length - 2; i >= 0 && name[i] === '\\'; i--) backslashes++;
  return backslashes % 2 === 0;
}

function serviceOwner(fqdn: string): string {
  const dot = fqdn.indexOf('.');
  return dot < 0 ? `_${fqdn}._tcp` : `_${fqdn.slice(0, dot)}._tcp${fqdn.slice(dot)}`;
}

/**
 * The zone for a set of services. A service whose fqdn is not a usable name strictly inside the zone,
 * or whose address is not IPv4, is left out (the caller can compare and report); on a duplicate fqdn the
 * first one wins, as the planner already refuses collisions.
 */
export function zoneFromServices(services: ServiceSpec[], suffix: string, ttl: number): Zone {
  const apex = normalizeName(suffix);
  const records = new Map<string, ZoneRecord>();
  for (const spec of services) {
    const fqdn = normalizeName(spec.fqdn);
    const usable = fqdn !== apex && isInside(fqdn, apex) && isEncodableName(serviceOwner(fqdn)) && !fqdn.includes('\\') && isIPv4(spec.address);
    if (usable && !records.has(fqdn)) records.set(fqdn, { address: spec.address, port: spec.port, service: spec.service });
  }
  return { suffix: apex, ttl: Math.max(0, Math.floor(ttl)), records };
}

/** Names that exist without records of their own, computed once per zone object. */
const emptyNonTerminals = new WeakMap<Zone, Set<string>>();

function emptyNames(zone: Zone): Set<string> {
  let names = emptyNonTerminals.get(zone);
  if (names) return names;
  names = new Set<string>();
  for (const fqdn of zone.records.keys()) {
    for (let name of [fqdn, serviceOwner(fqdn)]) {
      for (let dot = name.indexOf('.'); dot >= 0; dot = name.indexOf('.')) {
        name = name.slice(dot + 1);
        if (name === zone.suffix || !isInside(name, zone.suffix)) break;
        names.add(name);
      }
    }
  }
  emptyNonTerminals.set(zone, names);
  return names;
}

export function findName(zone: Zone, queryName: string): ZoneMatch {
  const name = normalizeName(queryName);
  if (!isInside(name, zone.suffix)) return { kind: 'outside' };
  if (name === zone.suffix) return { kind: 'apex' };
  const record = zone.records.get(name);
  if (record) return { kind: 'host', fqdn: name, record };
  const srv = /^_([^.]+)\._tcp(\..+)?$/.exec(name);
  if (srv) {
    const fqdn = `${srv[1]}${srv[2] ?? ''}`;
    const target = zone.records.get(fqdn);
    if (target) return { kind: 'service', fqdn, record: target };
  }
  return emptyNames(zone).has(name) ? { kind: 'empty' } : { kind: 'missing' };
}
