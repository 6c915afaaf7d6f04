import { balancePolicies, defaultBalancePolicy, type BackendSpec, type BalancePolicy, type EmptyPolicy, type ServiceSpec, type SubsetSpec } from '../contract/balancer-config.js';
import { emptyTrafficDoc, type TrafficDoc } from '../contract/traffic.js';
import type { Catalog, Instance } from '../consul/catalog.js';
import { codes } from '../errors.js';
import { addressOf, inRange, mirrorAddress, type AddressRange, type AddressTable } from './addresses.js';
import { gatewayBackends, type Gateway } from './gateways.js';
import { describe, isHostAddress } from '../validate.js';
import { dnsLabel } from './names.js';
import { choosePort } from './ports.js';

const controlCharacter = /[\u0000-\u001f\u007f]/;

/** A route is what the data plane serves for one service; its shape is balancer.json's, every field set. */
export type Route = ServiceSpec & Required<Pick<ServiceSpec, 'split' | 'limits' | 'outlier' | 'gateways'>>;

/** Instance meta that chooses a service's balancing policy (the KV traffic document overrides it). */
export const policyMetaKey = 'loopmesh-lb';

export interface PlanProblem {
  service: string;
  code: string;
  message: string;
}

export interface PlanOptions {
  suffix: string;
  empty: EmptyPolicy;
  /** loopmesh's own addresses: a backend inside it would be one of its listeners (a loop). */
  range?: AddressRange;
  /** The policy of a service that sets none (flag --lb-policy); default p2c-ewma. */
  policy?: BalancePolicy;
  /** Consul service name -> its traffic document from KV (split, policy, limits, outlier). */
  traffic?: ReadonlyMap<string, TrafficDoc>;
  /** A node: the proxy cluster, each service's last resort (needs `range`). */
  gateways?: readonly Gateway[];
  /**
   * A gateway (`loopmesh gateway`): every service listens at the mirror of its loopback address in
   * this range instead (needs `range`); a service past the range's end is reported and not served.
   */
  gatewayRange?: AddressRange;
  /** Consul services that are not routed (the gateway service: nodes use it, nobody connects to it by name). */
  skip?: ReadonlySet<string>;
  /** planLabels of the catalog's services less `skip`, when the caller has it already. */
  labels?: { labels: Map<string, string>; problems: PlanProblem[] };
  /**
   * Kept between plans by a caller that plans again and again (the agent): a service whose inputs are
   * the very same objects as last time (its instances from the watcher, its traffic document, its
   * address, label and port, the gateways) keeps its route object and problems. Routes are never
   * mutated after a plan, so templates and the balancer can tell an unchanged route by identity.
   */
  memo?: PlanMemo;
}

interface MemoEntry {
  instances: readonly Instance[] | undefined;
  traffic: TrafficDoc;
  label: string;
  address: string;
  previousPort: number | undefined;
  gateways: string;
  route: Route | undefined;
  problems: PlanProblem[];
}

/** Per-service results of the last plan (see PlanOptions.memo). */
export class PlanMemo {
  entries = new Map<string, MemoEntry>();
  /** The options a memo's entries were made with: other options make every entry stale. */
  scope = '';
}

/**
 * The policy the instances ask for in meta `loopmesh-lb`: the most common valid value (ties go to the
 * first in balancePolicies); undefined when none sets one. An unknown value is reported and ignored.
 */
export function metaPolicy(service: string, instances: readonly Instance[], problems: PlanProblem[]): BalancePolicy | undefined {
  const counts = new Map<BalancePolicy, number>();
  const wrong = new Set<string>();
  for (const i of instances) {
    const value = i.meta[policyMetaKey];
    if (value === undefined) continue;
    if ((balancePolicies as readonly string[]).includes(value)) counts.set(value as BalancePolicy, (counts.get(value as BalancePolicy) ?? 0) + 1);
    else wrong.add(value);
  }
  for (const value of wrong) {
    problems.push({ service, code: codes.planInvalidPolicy, message: `service "${service}": meta ${policyMetaKey} is ${describe(value)}; expected one of ${balancePolicies.join(', ')}; ignored` });
  }
  let best: BalancePolicy | undefined;
  for (const policy of balancePolicies) if ((counts.get(policy) ?? 0) > (best ? counts.get(best) ?? 0 : 0)) best = policy;
  return best;
}

/**
 * A split's subsets: one per tag in the document's order, then "" (every instance with none of the
 * tags) with what is left of 100. An instance is in the subset of the first split tag it carries.
 */
export function splitSubsets(doc: TrafficDoc): SubsetSpec[] {
  if (doc.split.length === 0) return [];
  const tagged = doc.split.map((s) => ({ name: s.tag, weight: s.weight }));
  const rest = 100 - tagged.reduce((sum, s) => sum + s.weight, 0);
  return [...tagged, { name: '', weight: rest }];
}

function subsetOf(instance: Instance, doc: TrafficDoc): string {
  return doc.split.find((s) => instance.tags.includes(s.tag))?.tag ?? '';
}

/** dnsLabel per service name, kept between plans (bounded: cleared when full). */
const labelCache = new Map<string, ReturnType<typeof dnsLabel>>();
const maxLabelCache = 100_000;

/**
 * Service names -> DNS labels. A name that cannot be a label, or that maps to the same label as
 * another, is reported and skipped. On a collision the service whose name already is the label
 * keeps it; without one, all of them are skipped, so a newcomer can never take a name in use.
 */
export function planLabels(services: readonly string[]): { labels: Map<string, string>; problems: PlanProblem[] } {
  const problems: PlanProblem[] = [];
  const byLabel = new Map<string, string[]>();
  for (const service of services) {
    let result = labelCache.get(service);
    if (result === undefined) {
      result = dnsLabel(service);
      if (labelCache.size >= maxLabelCache) labelCache.clear();
      labelCache.set(service, result);
    }
    if (!result.ok) {
      problems.push({ service, code: codes.planInvalidName, message: `service name ${describe(service)} cannot be a DNS label: it ${result.reason.startsWith('is ') ? result.reason : `has characters outside the set; ${result.reason}`}` });
      continue;
    }
    const owners = byLabel.get(result.label);
    if (owners) owners.push(service);
    else byLabel.set(result.label, [service]);
  }
  const labels = new Map<string, string>();
  for (const [label, owners] of byLabel) {
    if (owners.length === 1) {
      labels.set(owners[0] as string, label);
      continue;
    }
    const exact = owners.find((s) => s === label);
    if (exact !== undefined) labels.set(exact, label);
    for (const service of owners.filter((s) => s !== exact)) {
      problems.push({
        service,
        code: codes.planNameCollision,
        message: `service ${JSON.stringify(service)} would be published as "${label}", which ${exact !== undefined ? `service "${exact}" has` : `services ${owners.map((o) => JSON.stringify(o)).join(', ')} all map to`}; rename one of them`,
      });
    }
  }
  return { labels, problems };
}

/** One service's route (or the problems that keep it out); see plan. */
function planService(service: string, label: string, addresses: AddressTable, addressOwner: ReadonlyMap<string, string>, previousPort: number | undefined, catalog: Catalog, options: PlanOptions): { route?: Route; problems: PlanProblem[] } {
  const local: PlanProblem[] = [];
  const instances = catalog.get(service) ?? [];
  const traffic = options.traffic?.get(service) ?? emptyTrafficDoc;
  const address = addressOf(addresses, label);
  if (address === undefined) {
    local.push({ service, code: codes.planNoAddress, message: `service "${service}" has no address allocated yet (Consul KV not reachable, the address table not writable there (LM_ERR_ADDRESS_TABLE_WRITE says why), or the range exhausted)` });
    return { problems: local };
  }
  if (addressOwner.get(address) !== service) return { problems: local };
  let listen = address;
  if (options.gatewayRange && options.range) {
    const mirrored = mirrorAddress(options.range, options.gatewayRange, address);
    if (mirrored === undefined) {
      local.push({ service, code: codes.gatewayNoAddress, message: `service "${service}" has the address ${address}, whose place in ${options.range.cidr} is past the end of this gateway's range ${options.gatewayRange.cidr}; not served here (expected a larger --gateway-range)` });
      return { problems: local };
    }
    listen = mirrored;
  }
  const port = choosePort(instances, previousPort);
  if (!port.ok) {
    local.push({ service, code: codes.planNoPort, message: `service "${service}": ${port.reason}` });
    return { problems: local };
  }
  const backends: BackendSpec[] = [];
  for (const i of instances) {
    // Checked where it entered (the catalog parser); checked again here because every value in a
    // route reaches rendered files, some of them line-based (haproxy.cfg, hosts).
    if (!isHostAddress(i.address) || controlCharacter.test(i.id)) {
      local.push({ service, code: codes.consulInvalidInstance, message: `service "${service}": instance ${JSON.stringify(i.id)} has the address ${JSON.stringify(i.address)}; expected an IP address or a host name; refused` });
      continue;
    }
    if (options.gatewayRange && inRange(options.gatewayRange, i.address)) {
      local.push({ service, code: codes.planSelfBackend, message: `service "${service}": instance ${i.id} has the address ${i.address}:${i.port}, inside this gateway's range ${options.gatewayRange.cidr}; refused (a connection would loop through loopmesh)` });
      continue;
    }
    if (options.range && inRange(options.range, i.address)) {
      local.push({ service, code: codes.planSelfBackend, message: `service "${service}": instance ${i.id} has the address ${i.address}:${i.port}, inside loopmesh's own range ${options.range.cidr}; refused (a connection would loop through loopmesh)` });
      continue;
    }
    backends.push({ id: i.id, address: i.address, port: i.port, weight: i.weight, subset: subsetOf(i, traffic) });
  }
  const route: Route = {
    service,
    name: label,
    fqdn: `${label}.${options.suffix}`,
    address: listen,
    port: port.port,
    policy: traffic.policy ?? metaPolicy(service, instances, local) ?? options.policy ?? defaultBalancePolicy,
    empty: options.empty,
    split: splitSubsets(traffic),
    limits: traffic.limits,
    outlier: traffic.outlier,
    gateways: options.gateways && options.range && !options.gatewayRange ? gatewayBackends(options.gateways, options.range, service, address, port.port) : [],
    backends,
  };
  return { problems: local, route };
}

/** A route's listener and its backends as address:port keys, once per route object (routes are never mutated). */
const keysOfRoute = new WeakMap<Route, { listen: string; backends: string[] }>();

function routeKeys(route: Route): { listen: string; backends: string[] } {
  let keys = keysOfRoute.get(route);
  if (keys === undefined) {
    keys = { listen: `${route.address}:${route.port}`, backends: route.backends.map((b) => `${b.address}:${b.port}`) };
    keysOfRoute.set(route, keys);
  }
  return keys;
}

/** catalog + addresses -> routes. Pure: the same input gives the same routes on every node. */
export function plan(
  catalog: Catalog,
  addresses: AddressTable,
  previous: readonly Route[],
  options: PlanOptions,
): { routes: Route[]; problems: PlanProblem[] } {
  const planned = options.labels ?? planLabels([...catalog.keys()].filter((s) => !options.skip?.has(s)));
  const labels = planned.labels;
  const problems = [...planned.problems];
  const previousByService = new Map(previous.map((r) => [r.service, r]));
  const routes: Route[] = [];
  // The table is reconciled to be unique; this guard keeps a table that is not from ever making two
  // listeners collide (which would fail the whole balancer.json, and with it every other service).
  // The first label in order keeps a shared address: the labels are sorted only when one is shared.
  const ownersOf = (entries: Iterable<[string, string]>): { owner: Map<string, string>; conflicts: PlanProblem[] } => {
    const owner = new Map<string, string>();
    const conflicts: PlanProblem[] = [];
    for (const [service, label] of entries) {
      const address = addressOf(addresses, label);
      if (address === undefined) continue;
      const first = owner.get(address);
      if (first === undefined) owner.set(address, service);
      else conflicts.push({ service, code: codes.planAddressConflict, message: `service "${service}" has the address ${address}, which "${first}" has too; not served until the address table is repaired` });
    }
    return { owner, conflicts };
  };
  let owned = ownersOf(labels);
  if (owned.conflicts.length > 0) owned = ownersOf([...labels].sort(([, a], [, b]) => (a < b ? -1 : a > b ? 1 : 0)));
  problems.push(...owned.conflicts);
  const addressOwner = owned.owner;
  const gatewaysKey = JSON.stringify(options.gateways ?? []);
  const memo = options.memo;
  const scope = JSON.stringify([options.suffix, options.empty, options.range, options.policy, options.gatewayRange]);
  if (memo && memo.scope !== scope) {
    memo.entries.clear();
    memo.scope = scope;
  }
  const kept = new Map<string, MemoEntry>();
  for (const [service, label] of labels) {
    const instances = catalog.get(service);
    const traffic = options.traffic?.get(service) ?? emptyTrafficDoc;
    const address = addressOf(addresses, label) ?? '';
    const previousPort = previousByService.get(service)?.port;
    const last = memo?.entries.get(service);
    let entry: MemoEntry;
    if (last && last.instances === instances && last.traffic === traffic && last.label === label && last.address === address && last.previousPort === previousPort && last.gateways === gatewaysKey && addressOwner.get(address) === service) {
      entry = last;
    } else {
      const result = planService(service, label, addresses, addressOwner, previousPort, catalog, options);
      entry = { instances, traffic, label, address, previousPort, gateways: gatewaysKey, route: result.route, problems: result.problems };
    }
    kept.set(service, entry);
    problems.push(...entry.problems);
    if (entry.route) routes.push(entry.route);
  }
  if (memo) memo.entries = kept;
  const byName = (a: Route, b: Route): number => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  // Usually in order already (the catalog's order): a check, not a sort of thousands.
  if (routes.some((r, i) => i > 0 && byName(routes[i - 1] as Route, r) > 0)) routes.sort(byName);
  // Backends that are another route's own listener (a hostname or a range other than ours).
  const listeners = new Set(routes.map((r) => routeKeys(r).listen));
  for (const route of routes) {
    const keys = routeKeys(route).backends;
    if (!keys.some((k) => listeners.has(k))) continue;
    const own = route.backends.filter((_, i) => listeners.has(keys[i] ?? ''));
    for (const b of own) problems.push({ service: route.service, code: codes.planSelfBackend, message: `service "${route.service}": instance ${b.id} at ${b.address}:${b.port} is one of loopmesh's own listeners; refused (a connection would loop)` });
    // A copy: a route may be kept from an earlier plan (see PlanOptions.memo) and is never mutated.
    if (own.length > 0) routes[routes.indexOf(route)] = { ...route, backends: route.backends.filter((b) => !own.includes(b)) };
  }
  return { routes, problems };
}
