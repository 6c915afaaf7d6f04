import { randomBytes } from 'node:crypto';
import { BalancerError, codes } from '../errors.js';
import { inRange, reservedAddresses, type AddressRange } from '../plan/addresses.js';
import { describe, expectArray, expectInteger, expectOneOf, expectRecord, expectString, ipv4ToInt, isHostAddress, isIPv4, isRecord } from '../validate.js';

/**
 * balancer.json: the one contract between the control plane (watch, plan, render) and the data plane
 * (balancer, DNS, hosts). Rendered from templates/balancer.json.hbs, loaded and checked here.
 */
export const emptyPolicies = ['reject', 'keep-last'] as const;
/** reject: keep listening but close new connections at once; keep-last: keep the last non-empty set. */
export type EmptyPolicy = (typeof emptyPolicies)[number];

/**
 * p2c-ewma (the default): of two backends drawn at random by weight, the one with the lower
 * EWMA connect time x (open connections + 1) / weight. least-conn: the lowest open connections /
 * weight. round-robin: smooth weighted round-robin (nginx's).
 */
export const balancePolicies = ['p2c-ewma', 'least-conn', 'round-robin'] as const;
export type BalancePolicy = (typeof balancePolicies)[number];
export const defaultBalancePolicy: BalancePolicy = 'p2c-ewma';

/** What happens to the open connections of a backend that left the set: left alone, cut at the drain deadline, or reset at once. */
export const drainPolicies = ['keep', 'drain', 'reset'] as const;
export type DrainPolicy = (typeof drainPolicies)[number];

/** Largest instance weight taken from Consul (its Weights.Passing / Weights.Warning). */
export const maxWeight = 65535;

export interface BackendSpec {
  /** Stable identity of an instance: NODE/SERVICE_ID. */
  id: string;
  address: string;
  port: number;
  /** Consul's Weights.Passing (or .Warning for a warning instance); 0 takes no new connections. Default 1. */
  weight?: number;
  /** The traffic-split subset the instance belongs to: a tag of the split, or "" (the default) for the rest. */
  subset?: string;
}

/** One part of a traffic split: `weight` percent of new connections go to backends of this subset. */
export interface SubsetSpec {
  /** A tag; "" is every instance carrying none of the split's tags. */
  name: string;
  /** 0 to 100; the subsets of a split add up to 100. */
  weight: number;
}

/** Per-service limits; what is absent comes from the serving process's flags. */
export interface LimitsSpec {
  connectTimeoutMs?: number;
  idleTimeoutMs?: number;
  /** Concurrent client connections; 0 is no limit. */
  maxConnections?: number;
  /** Connections that wait for a slot when maxConnections are open; 0 refuses at once. */
  queue?: number;
  /** How long a queued connection waits before it is refused. */
  queueTimeoutMs?: number;
  drain?: DrainPolicy;
  /** With drain "drain": how long a removed backend's connections may go on. */
  drainTimeoutMs?: number;
}

/** Passive health (outlier ejection); what is absent takes the defaults in agent/balancer/outlier.ts. */
export interface OutlierSpec {
  /** Connect failures, timeouts or resets before the first byte, in a row, that eject a backend. */
  consecutiveFailures?: number;
  /** The first ejection's length; each ejection in a row doubles it, up to maxEjectionMs. */
  baseEjectionMs?: number;
  maxEjectionMs?: number;
  /** At most this share of a service's backends is ejected at once (at least one). */
  maxEjectedPercent?: number;
  /** When fewer than this share of the backends are usable, ejections are ignored (all are used). */
  panicThresholdPercent?: number;
}

export interface ServiceSpec {
  /** The service's name in Consul. */
  service: string;
  /** The DNS label it is published under (NAME in NAME.local). */
  name: string;
  /** Fully qualified name without the trailing dot, e.g. web.local. */
  fqdn: string;
  address: string;
  port: number;
  policy: BalancePolicy;
  empty: EmptyPolicy;
  backends: BackendSpec[];
  /** A traffic split (gray release) by subset; absent or empty: no split. */
  split?: SubsetSpec[];
  limits?: LimitsSpec;
  outlier?: OutlierSpec;
  /**
   * The proxy cluster's addresses for this service (`loopmesh gateway`), in the order to try: the
   * last resort when no direct connect to a backend works, and the hosts block's lines after the
   * loopback one. Absent or empty on a gateway itself (a gateway never forwards to a gateway).
   */
  gateways?: BackendSpec[];
}

/** Most gateways a service lists: more would only make a failing connect take longer. */
export const maxGateways = 16;

export interface BalancerConfig {
  version: 1;
  services: ServiceSpec[];
}

/** Newlines, tabs and other control characters: never in a value that reaches a log line or a rendered file. */
const controlCharacter = /[\u0000-\u001f\u007f]/;
const dnsLabelPattern = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/i;

function isDnsName(value: string): boolean {
  return value.length <= 253 && value.split('.').every((label) => dnsLabelPattern.test(label));
}

/**
 * Where a service may listen: a loopback address (Linux routes all of 127/8 to lo), not the network
 * or broadcast address, and none other software owns. Anything else (0.0.0.0, an address of the
 * host's network) would expose the service beyond this node or take an address that is not ours.
 */
function listenAddressProblem(address: string): string | undefined {
  if (!isIPv4(address)) return 'expected an IPv4 address';
  const n = ipv4ToInt(address);
  if (n >>> 24 !== 127) return 'expected a loopback address inside 127.0.0.0/8 (anything else would be reachable from other hosts or not this node\'s)';
  if ((n & 0xffffff) === 0 || (n & 0xffffff) === 0xffffff) return 'expected a host address of 127.0.0.0/8, not its network or broadcast address';
  if (reservedAddresses.includes(address)) return `expected an address other software does not own (not ${reservedAddresses.join(', ')})`;
  return undefined;
}

/** A gateway process listens only inside its --gateway-range: the run dir cannot make it bind anything else. */
function gatewayListenProblem(address: string, range: AddressRange): string | undefined {
  return inRange(range, address) ? undefined : `expected an address inside this gateway's range ${range.cidr}`;
}

/** A gateway is another host: an IPv4 address outside 127/8, 0/8 and multicast. */
function gatewayAddressProblem(address: string): string | undefined {
  if (!isIPv4(address)) return 'expected an IPv4 address';
  const first = ipv4ToInt(address) >>> 24;
  if (first === 127 || first === 0 || first >= 224) return 'expected a unicast address of another host (not 0/8, 127/8, multicast or reserved)';
  return undefined;
}

function expectText(value: unknown, where: string): string {
  const text = expectString(value, where);
  if (text.length === 0 || controlCharacter.test(text)) throw new TypeError(`${where}: expected a non-empty string without control characters, got ${describe(text)}`);
  return text;
}

function parseBackend(value: unknown, where: string): BackendSpec {
  const raw = expectRecord(value, where);
  const address = expectString(raw.address, `${where}.address`);
  if (!isHostAddress(address)) throw new TypeError(`${where}.address: expected an IP address or an RFC 1123 host name, got ${describe(address)}`);
  return {
    id: expectText(raw.id, `${where}.id`),
    address,
    port: expectInteger(raw.port, `${where}.port`, 1, 65535),
    weight: raw.weight === undefined ? 1 : expectInteger(raw.weight, `${where}.weight`, 0, maxWeight),
    subset: raw.subset === undefined ? '' : expectString(raw.subset, `${where}.subset`),
  };
}

function parseSplit(value: unknown, where: string): SubsetSpec[] {
  const list = expectArray(value, where);
  // The KV document allows maxSplitParts tags, plus the rest.
  if (list.length > 33) throw new TypeError(`${where}: ${list.length} subsets; expected at most 33`);
  const subsets = list.map((v, i) => {
    const raw = expectRecord(v, `${where}[${i}]`);
    const name = expectString(raw.name, `${where}[${i}].name`);
    if (controlCharacter.test(name)) throw new TypeError(`${where}[${i}].name: expected a tag without control characters, got ${describe(name)}`);
    return { name, weight: expectInteger(raw.weight, `${where}[${i}].weight`, 0, 100) };
  });
  if (subsets.length === 0) return subsets;
  const total = subsets.reduce((sum, s) => sum + s.weight, 0);
  if (total !== 100) throw new TypeError(`${where}: expected weights that add up to 100, got ${total}`);
  if (new Set(subsets.map((s) => s.name)).size !== subsets.length) throw new TypeError(`${where}: expected each subset once`);
  return subsets;
}

/** Milliseconds up to 24 hours, or a count up to a million: generous bounds that still catch a typo. */
const maxMs = 86_400_000;

function optionalInteger(raw: Record<string, unknown>, key: string, where: string, min: number, max: number): number | undefined {
  return raw[key] === undefined ? undefined : expectInteger(raw[key], `${where}.${key}`, min, max);
}

function withoutUndefined<T extends object>(value: T): T {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as T;
}

export function parseLimits(value: unknown, where: string): LimitsSpec {
  const raw = expectRecord(value, where);
  return withoutUndefined({
    connectTimeoutMs: optionalInteger(raw, 'connectTimeoutMs', where, 1, maxMs),
    idleTimeoutMs: optionalInteger(raw, 'idleTimeoutMs', where, 1, maxMs),
    maxConnections: optionalInteger(raw, 'maxConnections', where, 0, 1_000_000),
    queue: optionalInteger(raw, 'queue', where, 0, 1_000_000),
    queueTimeoutMs: optionalInteger(raw, 'queueTimeoutMs', where, 1, maxMs),
    drain: raw.drain === undefined ? undefined : expectOneOf(raw.drain, `${where}.drain`, drainPolicies),
    drainTimeoutMs: optionalInteger(raw, 'drainTimeoutMs', where, 0, maxMs),
  });
}

export function parseOutlier(value: unknown, where: string): OutlierSpec {
  const raw = expectRecord(value, where);
  return withoutUndefined({
    consecutiveFailures: optionalInteger(raw, 'consecutiveFailures', where, 1, 1000),
    baseEjectionMs: optionalInteger(raw, 'baseEjectionMs', where, 1, maxMs),
    maxEjectionMs: optionalInteger(raw, 'maxEjectionMs', where, 1, maxMs),
    maxEjectedPercent: optionalInteger(raw, 'maxEjectedPercent', where, 0, 100),
    panicThresholdPercent: optionalInteger(raw, 'panicThresholdPercent', where, 0, 100),
  });
}

function parseGateways(value: unknown, where: string): BackendSpec[] {
  const list = expectArray(value, where);
  if (list.length > maxGateways) throw new TypeError(`${where}: ${list.length} gateways; expected at most ${maxGateways}`);
  return list.map((v, i) => {
    const gateway = parseBackend(v, `${where}[${i}]`);
    const wrong = gatewayAddressProblem(gateway.address);
    if (wrong) throw new TypeError(`${where}[${i}].address: ${wrong}, got ${describe(gateway.address)}`);
    return gateway;
  });
}

function parseGatewaysHere(value: unknown, where: string, options: ParseOptions): BackendSpec[] {
  const gateways = parseGateways(value, where);
  if (options.gatewayRange && gateways.length > 0) throw new TypeError(`${where}: a gateway's config lists ${gateways.length} gateways; expected none (a gateway never forwards to another gateway)`);
  return gateways;
}

/** Where this process may listen: loopback (a node), or inside its --gateway-range (a gateway). */
export interface ParseOptions {
  gatewayRange?: AddressRange;
}

function parseService(value: unknown, where: string, options: ParseOptions): ServiceSpec {
  const raw = expectRecord(value, where);
  const service = expectText(raw.service, `${where}.service`);
  try {
    return parseServiceFields(raw, service, where, options);
  } catch (err) {
    throw new TypeError(`${(err as Error).message} (service ${JSON.stringify(service)})`, { cause: err });
  }
}

function parseServiceFields(raw: Record<string, unknown>, service: string, where: string, options: ParseOptions): ServiceSpec {
  const address = expectString(raw.address, `${where}.address`);
  const wrongAddress = options.gatewayRange ? gatewayListenProblem(address, options.gatewayRange) : listenAddressProblem(address);
  if (wrongAddress) throw new TypeError(`${where}.address: ${wrongAddress}, got ${describe(address)}`);
  const name = expectString(raw.name, `${where}.name`);
  if (!dnsLabelPattern.test(name)) throw new TypeError(`${where}.name: expected a DNS label (letters, digits and inner "-", at most 63), got ${describe(name)}`);
  const fqdn = expectString(raw.fqdn, `${where}.fqdn`).toLowerCase();
  if (!isDnsName(fqdn)) throw new TypeError(`${where}.fqdn: expected a DNS name such as web.local (labels of letters, digits and inner "-", no trailing dot), got ${describe(fqdn)}`);
  return {
    service,
    name,
    fqdn,
    address,
    port: expectInteger(raw.port, `${where}.port`, 1, 65535),
    policy: expectOneOf(raw.policy ?? defaultBalancePolicy, `${where}.policy`, balancePolicies),
    empty: expectOneOf(raw.empty ?? 'reject', `${where}.empty`, emptyPolicies),
    backends: expectArray(raw.backends, `${where}.backends`).map((b, i) => parseBackend(b, `${where}.backends[${i}]`)),
    ...(raw.split === undefined ? {} : { split: parseSplit(raw.split, `${where}.split`) }),
    ...(raw.limits === undefined ? {} : { limits: parseLimits(raw.limits, `${where}.limits`) }),
    ...(raw.outlier === undefined ? {} : { outlier: parseOutlier(raw.outlier, `${where}.outlier`) }),
    ...(raw.gateways === undefined ? {} : { gateways: parseGatewaysHere(raw.gateways, `${where}.gateways`, options) }),
  };
}

/** "::ffff:127.66.1.1" dials 127.66.1.1: compare backends to listeners by the address they reach. */
function dialed(address: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return mapped?.[1] ?? address;
}

/**
 * The services of the last parse by their raw JSON (and the range they were checked against): a
 * service whose JSON did not change is not checked again and keeps its object, so the balancer can
 * tell it unchanged by identity. At 2,000 services one change re-checks one service, not 2,000.
 * Only what the last parse used is kept. Specs are never mutated after parsing.
 */
let checkedServices = new Map<string, ServiceSpec>();

/**
 * A rendered balancer.json as the template produced it: the text is `prefix`, the parts joined, then
 * `suffix`; each part should be one element of the services array (and a comma between them). The
 * renderer knows these (templates.ts, RenderedBlock); a caller that passes them vouches for that.
 */
export interface ServicesBlock {
  prefix: string;
  suffix: string;
  parts: readonly string[];
}

/** Per process: a string no template can produce, standing in for the services while the rest of the document is parsed. */
const placeholder = `loopmesh-services-${randomBytes(12).toString('hex')}`;

/** The specs of the last parse by part, as parseByParts found them (and the range they were checked against). */
let checkedParts = new Map<string, ServiceSpec>();

function isJsonSpace(code: number): boolean {
  return code === 0x20 || code === 0x0a || code === 0x0d || code === 0x09;
}

/** The part's one element, without JSON whitespace around it and its comma (expected unless it is the last). */
function elementOf(part: string, last: boolean): string | undefined {
  let end = part.length;
  while (end > 0 && isJsonSpace(part.charCodeAt(end - 1))) end -= 1;
  if (!last) {
    if (end === 0 || part.charCodeAt(end - 1) !== 0x2c) return undefined;
    end -= 1;
    while (end > 0 && isJsonSpace(part.charCodeAt(end - 1))) end -= 1;
  }
  let start = 0;
  while (start < end && isJsonSpace(part.charCodeAt(start))) start += 1;
  return start < end ? part.slice(start, end) : undefined;
}

/**
 * The same result as parsing the whole text, at the cost of the parts that changed: when the
 * document with a placeholder in the block's place parses to exactly [placeholder] as its services,
 * and each part is one element, only parts not seen in the last parse are parsed and checked. Anything else (or any invalid part):
 * undefined, and the caller parses the whole text, which gives the error its usual words.
 */
function parseByParts(text: string, source: string, options: ParseOptions, block: ServicesBlock): BalancerConfig | undefined {
  if (block.parts.length === 0) return undefined;
  // A cheap check of the caller's word (the text itself is not read: it may be megabytes).
  let length = block.prefix.length + block.suffix.length;
  for (const part of block.parts) length += part.length;
  if (length !== text.length) return undefined;
  let skeleton: unknown;
  try {
    skeleton = JSON.parse(`${block.prefix}"${placeholder}"${block.suffix}`);
  } catch {
    return undefined;
  }
  if (!isRecord(skeleton) || skeleton.version !== 1 || !Array.isArray(skeleton.services) || skeleton.services.length !== 1 || skeleton.services[0] !== placeholder) return undefined;
  const scope = options.gatewayRange ? `${options.gatewayRange.cidr}\u0000` : '';
  const checked = new Map<string, ServiceSpec>();
  const services: ServiceSpec[] = [];
  const n = block.parts.length;
  for (let i = 0; i < n; i++) {
    const part = block.parts[i] ?? '';
    const key = scope + part;
    let spec = checked.get(key) ?? checkedParts.get(key);
    if (spec === undefined) {
      const element = elementOf(part, i === n - 1);
      if (element === undefined) return undefined;
      try {
        spec = parseService(JSON.parse(element), `${source}.services[${i}]`, options);
      } catch {
        return undefined;
      }
    }
    checked.set(key, spec);
    services.push(spec);
  }
  try {
    checkAcross(services, source);
  } catch {
    return undefined;
  }
  checkedParts = checked;
  return { version: 1, services };
}

/** Each checked service's listener key and its backends' as they dial (specs are never mutated). */
const keysOfSpec = new WeakMap<ServiceSpec, { listen: string; dialed: string[] }>();

function keysOf(s: ServiceSpec): { listen: string; dialed: string[] } {
  let keys = keysOfSpec.get(s);
  if (keys === undefined) {
    keys = { listen: `${s.address}:${s.port}`, dialed: s.backends.map((b) => `${dialed(b.address)}:${b.port}`) };
    keysOfSpec.set(s, keys);
  }
  return keys;
}

/** One service per address and port, and no backend that is one of the listeners. */
function checkAcross(services: readonly ServiceSpec[], source: string): void {
  const seen = new Map<string, string>();
  for (const s of services) {
    const key = keysOf(s).listen;
    const other = seen.get(key);
    if (other) throw new TypeError(`${source}: services "${other}" and "${s.service}" both listen on ${key}; expected one service per address and port`);
    seen.set(key, s.service);
  }
  // A backend that is one of these listeners would make each connection dial itself until fds run out.
  for (const s of services) {
    const keys = keysOf(s).dialed;
    for (let i = 0; i < keys.length; i++) {
      const owner = seen.get(keys[i] ?? '');
      const b = s.backends[i];
      if (owner && b) throw new BalancerError(codes.balancerSelfBackend, `${source}: service "${s.service}" has the backend ${b.id} at ${b.address}:${b.port}, which is the listener of service "${owner}"; expected no backend that is one of loopmesh's own listeners (a connection would loop)`);
    }
  }
}

/**
 * Parses and checks a rendered balancer.json; throws a BalancerError naming the bad value. `blocks`:
 * the routes blocks the template rendered (the renderer knows them), so unchanged services are not
 * parsed again; the result is the same as without them.
 */
export function parseBalancerConfig(text: string, source = 'balancer.json', options: ParseOptions = {}, blocks: readonly ServicesBlock[] = []): BalancerConfig {
  for (const block of blocks) {
    const config = parseByParts(text, source, options, block);
    if (config) return config;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    throw new BalancerError(codes.balancerConfig, `${source}: not valid JSON (${(cause as Error).message})`, { cause });
  }
  try {
    const raw = expectRecord(json, source);
    if (raw.version !== 1) throw new TypeError(`${source}.version: expected 1, got ${JSON.stringify(raw.version)}`);
    const scope = options.gatewayRange ? `${options.gatewayRange.cidr}\u0000` : '';
    const checked = new Map<string, ServiceSpec>();
    const services = expectArray(raw.services, `${source}.services`).map((s, i) => {
      const key = scope + JSON.stringify(s);
      const spec = checked.get(key) ?? checkedServices.get(key) ?? parseService(s, `${source}.services[${i}]`, options);
      checked.set(key, spec);
      return spec;
    });
    checkAcross(services, source);
    checkedServices = checked;
    return { version: 1, services };
  } catch (cause) {
    if (cause instanceof BalancerError) throw cause;
    throw new BalancerError(codes.balancerConfig, (cause as Error).message, { cause });
  }
}
