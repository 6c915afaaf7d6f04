import { BalancerError, codes } from '../errors.js';
import { expectArray, expectInteger, expectOneOf, expectRecord, expectString, isIPv4 } from '../validate.js';

/**
 * balancer.json: the one contract between the control plane (watch, plan, render) and the data plane
 * (balancer, DNS, hosts). Rendered from templates/balancer.json.hbs, loaded and checked here.
 */
export const emptyPolicies = ['reject', 'keep-last'] as const;
/** reject: keep listening but close new connections at once; keep-last: keep the last non-empty set. */
export type EmptyPolicy = (typeof emptyPolicies)[number];

export const balancePolicies = ['round-robin'] as const;
export type BalancePolicy = (typeof balancePolicies)[number];

export interface BackendSpec {
  /** Stable identity of an instance: NODE/SERVICE_ID. */
  id: string;
  address: string;
  port: number;
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
}

export interface BalancerConfig {
  version: 1;
  services: ServiceSpec[];
}

function parseBackend(value: unknown, where: string): BackendSpec {
  const raw = expectRecord(value, where);
  const address = expectString(raw.address, `${where}.address`);
  if (address.length === 0) throw new TypeError(`${where}.address: expected a host or IP address, got ""`);
  return {
    id: expectString(raw.id, `${where}.id`),
    address,
    port: expectInteger(raw.port, `${where}.port`, 1, 65535),
  };
}

function parseService(value: unknown, where: string): ServiceSpec {
  const raw = expectRecord(value, where);
  const address = expectString(raw.address, `${where}.address`);
  if (!isIPv4(address)) throw new TypeError(`${where}.address: expected an IPv4 address, got "${address}"`);
  return {
    service: expectString(raw.service, `${where}.service`),
    name: expectString(raw.name, `${where}.name`),
    fqdn: expectString(raw.fqdn, `${where}.fqdn`).toLowerCase(),
    address,
    port: expectInteger(raw.port, `${where}.port`, 1, 65535),
    policy: expectOneOf(raw.policy ?? 'round-robin', `${where}.policy`, balancePolicies),
    empty: expectOneOf(raw.empty ?? 'reject', `${where}.empty`, emptyPolicies),
    backends: expectArray(raw.backends, `${where}.backends`).map((b, i) => parseBackend(b, `${where}.backends[${i}]`)),
  };
}

/** Parses and checks a rendered balancer.json; throws a BalancerError naming the bad value. */
export function parseBalancerConfig(text: string, source = 'balancer.json'): BalancerConfig {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    throw new BalancerError(codes.balancerConfig, `${source}: not valid JSON (${(cause as Error).message})`, { cause });
  }
  try {
    const raw = expectRecord(json, source);
    if (raw.version !== 1) throw new TypeError(`${source}.version: expected 1, got ${JSON.stringify(raw.version)}`);
    const services = expectArray(raw.services, `${source}.services`).map((s, i) => parseService(s, `${source}.services[${i}]`));
    const seen = new Map<string, string>();
    for (const s of services) {
      const key = `${s.address}:${s.port}`;
      const other = seen.get(key);
      if (other) throw new TypeError(`${source}: services "${other}" and "${s.service}" both listen on ${key}; expected one service per address and port`);
      seen.set(key, s.service);
    }
    return { version: 1, services };
  } catch (cause) {
    if (cause instanceof BalancerError) throw cause;
    throw new BalancerError(codes.balancerConfig, (cause as Error).message, { cause });
  }
}
