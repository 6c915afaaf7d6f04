import { ConsulError, codes, type Problem } from '../errors.js';
import { describe, isHostAddress, isRecord } from '../validate.js';

/** One healthy instance of a service, as the rest of the agent sees it. */
export interface Instance {
  /** NODE/SERVICE_ID: unique in a datacenter. */
  id: string;
  node: string;
  address: string;
  port: number;
  datacenter: string;
  tags: string[];
  meta: Record<string, string>;
  status: 'passing' | 'warning';
  /** Consul's Weights.Passing, or Weights.Warning for a warning instance (default 1). */
  weight: number;
}

/** Service name -> its healthy instances, sorted by id. Services with none are kept, with []. */
export type Catalog = ReadonlyMap<string, readonly Instance[]>;

export interface HealthFilter {
  /** Count instances whose worst check is "warning" as healthy. */
  allowWarning: boolean;
}

/** Where data from Consul is rejected, and why; reported, never thrown at the rest of the agent. */
export type CatalogProblem = Problem & { service: string };

/** What one good /v1/health/service/NAME answer gives. */
export interface HealthServiceAnswer {
  instances: Instance[];
  /** Every node with a valid instance of the service, healthy or not. */
  nodes: string[];
  /** Instances skipped one by one (LM_ERR_CONSUL_INVALID_INSTANCE): the others still route. */
  problems: CatalogProblem[];
  /** Every registration of the service as Consul holds it (healthy or not): what a later change is compared with. */
  registered: Registration[];
}

/** One instance's registration, raw: a change of any of these is a change of the service. */
export interface Registration {
  node: string;
  id: string;
  /** The service's own address ("" when it uses the node's). */
  address: string;
  port: number;
}

const statusRank: Record<string, number> = { passing: 0, warning: 1, critical: 2, maintenance: 3 };

function stringRecord(value: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (!isRecord(value)) return out;
  for (const [k, v] of Object.entries(value)) if (typeof v === 'string') out[k] = v;
  return out;
}

// C0, DEL, C1 and the Unicode line and paragraph separators: each can end a line in some reader.
const controlCharacter = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/;

/** Node names and service ids become backend ids in rendered files: one printable line, not too long. */
function isSaneId(value: string): boolean {
  return value !== '' && value.length <= 512 && !controlCharacter.test(value);
}

/** Consul's Weights.Passing / Weights.Warning; anything but an integer from 0 to 65535 counts as 1 (Consul's default). */
function instanceWeight(weights: unknown, which: 'Passing' | 'Warning'): number {
  const value = isRecord(weights) ? weights[which] : undefined;
  return typeof value === 'number' && Number.isInteger(value) && value >= 0 && value <= 65535 ? value : 1;
}

/** What a health entry lacks of the shape Consul documents ({Node: {...}, Service: {...}, Checks: [...]}); undefined when it has it. */
function entryShapeError(entry: unknown): string | undefined {
  if (!isRecord(entry)) return `expected an object with Node, Service and Checks, got ${describe(entry)}`;
  const wrong: string[] = [];
  if (!isRecord(entry.Node)) wrong.push(`Node: expected an object, got ${describe(entry.Node)}`);
  else if (typeof entry.Node.Node !== 'string') wrong.push(`Node.Node: expected a string, got ${describe(entry.Node.Node)}`);
  if (!isRecord(entry.Service)) wrong.push(`Service: expected an object, got ${describe(entry.Service)}`);
  else if (typeof entry.Service.ID !== 'string') wrong.push(`Service.ID: expected a string, got ${describe(entry.Service.ID)}`);
  if (!Array.isArray(entry.Checks)) wrong.push(`Checks: expected an array, got ${describe(entry.Checks)}`);
  return wrong.length > 0 ? wrong.join('; ') : undefined;
}

/**
 * /v1/health/service/NAME -> healthy instances. An answer without the shape Consul documents (not an
 * array, or any entry without Node and Service objects and a Checks array) throws a ConsulError
 * LM_ERR_CONSUL_INVALID_DATA: none of it is trusted, so the caller keeps its last good read. An
 * instance with a bad address, port, id or node name is skipped and reported, so one bad
 * registration never hides the good ones.
 */
export function parseHealthService(service: string, body: unknown, filter: HealthFilter): HealthServiceAnswer {
  const name = JSON.stringify(service);
  const path = `health/service/${encodeURIComponent(service)}`;
  if (!Array.isArray(body)) {
    throw new ConsulError(codes.consulInvalidData, `${path}: expected an array of {Node, Service, Checks} entries, got ${describe(body)}`);
  }
  body.forEach((entry, i) => {
    const wrong = entryShapeError(entry);
    if (wrong !== undefined) throw new ConsulError(codes.consulInvalidData, `${path}: entry ${i} of ${body.length}: ${wrong}`);
  });
  const problems: CatalogProblem[] = [];
  const nodes = new Set<string>();
  const instances: Instance[] = [];
  const registered: Registration[] = [];
  const skip = (id: string, node: string, what: string, got: unknown, expected: string): void => {
    problems.push({
      service,
      code: codes.consulInvalidInstance,
      message: `service ${name}: instance ${JSON.stringify(id)} on node ${JSON.stringify(node)} has ${what} ${describe(got)}; expected ${expected}; the instance is skipped, the others still route`,
    });
  };
  for (const entry of body as Array<{ Node: Record<string, unknown>; Service: Record<string, unknown>; Checks: unknown[] }>) {
    const node = entry.Node;
    const svc = entry.Service;
    const nodeName = node.Node as string;
    const id = svc.ID as string;
    // Consul matches service names case-insensitively here: /health/service/api also returns "API".
    // Those belong to the other service (read, checked and reported on its own), not to this one.
    if (typeof svc.Service === 'string' && svc.Service !== service) continue;
    if (!isSaneId(nodeName)) {
      skip(id, nodeName, 'the node name', nodeName, 'a non-empty name of at most 512 characters without control characters');
      continue;
    }
    if (!isSaneId(id)) {
      skip(id, nodeName, 'the service ID', id, 'a non-empty ID of at most 512 characters without control characters');
      continue;
    }
    // Every node with an instance, healthy or not: a node-level check there (serfHealth) turning
    // passing again must bring this service's instances back, so the watcher has to know of them.
    nodes.add(nodeName);
    registered.push({ node: nodeName, id, address: typeof svc.Address === 'string' ? svc.Address : '', port: typeof svc.Port === 'number' ? svc.Port : 0 });
    const address = svc.Address === undefined || svc.Address === '' ? node.Address : svc.Address;
    if (typeof address !== 'string' || !isHostAddress(address)) {
      skip(id, nodeName, 'the address', address, 'an IP address (IPv4, or IPv6 without a zone) or a host name (RFC 1123: at most 253 characters, labels of 1 to 63 letters, digits and inner hyphens)');
      continue;
    }
    const port = svc.Port;
    if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) {
      skip(id, nodeName, 'the port', port, 'an integer from 1 to 65535');
      continue;
    }
    let worst = 0;
    for (const check of entry.Checks) {
      const status = isRecord(check) && typeof check.Status === 'string' ? check.Status : 'critical';
      worst = Math.max(worst, statusRank[status] ?? 2);
    }
    if (worst > (filter.allowWarning ? 1 : 0)) continue;
    instances.push({
      id: `${nodeName}/${id}`,
      node: nodeName,
      address,
      port,
      datacenter: typeof node.Datacenter === 'string' && isSaneId(node.Datacenter) ? node.Datacenter : '',
      tags: Array.isArray(svc.Tags) ? svc.Tags.filter((t): t is string => typeof t === 'string') : [],
      meta: stringRecord(svc.Meta),
      status: worst === 0 ? 'passing' : 'warning',
      weight: instanceWeight(svc.Weights, worst === 0 ? 'Passing' : 'Warning'),
    });
  }
  instances.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  return { instances, nodes: [...nodes].sort(), problems, registered };
}

/** A filter expression (Consul's bexpr) string: JSON's quoting, which bexpr reads the same way. */
function quote(value: string): string {
  return JSON.stringify(value);
}

/**
 * Filters for /v1/catalog/services that list the services with a registration other than the ones
 * known (a new address or port, a new instance): one expression per group of services, each at most
 * about maxChars long, so that a URL stays well under what Consul's HTTP server takes.
 */
export function changedRegistrationFilters(known: ReadonlyMap<string, readonly Registration[]>, maxChars = 24_000): string[] {
  const filters: string[] = [];
  let names: string[] = [];
  let clauses: string[] = [];
  let size = 0;
  const flush = (): void => {
    if (names.length === 0) return;
    const scope = names.map((n) => `ServiceName == ${quote(n)}`).join(' or ');
    filters.push(clauses.length > 0 ? `(${scope}) and not (${clauses.join(' or ')})` : `(${scope})`);
    names = [];
    clauses = [];
    size = 0;
  };
  for (const [service, list] of known) {
    const mine = list.map((r) => `(Node == ${quote(r.node)} and ServiceID == ${quote(r.id)} and ServiceAddress == ${quote(r.address)} and ServicePort == ${r.port})`);
    const cost = service.length + 20 + mine.reduce((sum, c) => sum + c.length + 4, 0);
    if (size > 0 && size + cost > maxChars) flush();
    names.push(service);
    clauses.push(...mine);
    size += cost;
  }
  flush();
  return filters;
}

/** /v1/catalog/services -> service name -> tags. */
export function parseCatalogServices(body: unknown): Map<string, string[]> {
  const out = new Map<string, string[]>();
  if (!isRecord(body)) throw new TypeError(`catalog/services: expected an object of service name -> tags, got ${describe(body)}`);
  for (const [name, tags] of Object.entries(body)) {
    out.set(name, Array.isArray(tags) ? tags.filter((t): t is string => typeof t === 'string') : []);
  }
  return out;
}

export interface ServiceSelection {
  /** Only these service names; all when empty. */
  services: readonly string[];
  /** Only services carrying this tag; any when undefined. */
  tag: string | undefined;
  /** Read whatever the two filters say (the gateway service: nodes need its instances). */
  always?: readonly string[];
}

/** Which services this node routes: never Consul itself, then the configured names and tag. */
export function selectServices(all: ReadonlyMap<string, readonly string[]>, selection: ServiceSelection): string[] {
  return [...all.entries()]
    .filter(([name]) => name !== 'consul')
    .filter(([name, tags]) => selection.always?.includes(name) || ((selection.services.length === 0 || selection.services.includes(name)) && (selection.tag === undefined || tags.includes(selection.tag))))
    .map(([name]) => name)
    .sort();
}

export interface CheckState {
  node: string;
  service: string;
  status: string;
  modifyIndex: string;
}

/** /v1/health/state/any -> check id -> state; bad entries are ignored (they carry no routing data). */
export function parseHealthState(body: unknown): Map<string, CheckState> {
  const out = new Map<string, CheckState>();
  if (!Array.isArray(body)) throw new TypeError(`health/state/any: expected an array of checks, got ${describe(body)}`);
  for (const c of body) {
    if (!isRecord(c) || typeof c.Node !== 'string' || typeof c.CheckID !== 'string') continue;
    out.set(`${c.Node}/${c.CheckID}`, {
      node: c.Node,
      service: typeof c.ServiceName === 'string' ? c.ServiceName : '',
      status: typeof c.Status === 'string' ? c.Status : '',
      modifyIndex: String(c.ModifyIndex ?? ''),
    });
  }
  return out;
}

/**
 * Which services a change in check states can affect. A node-level check (no service) affects
 * every service with an instance on that node, so those are looked up in `nodesOf`, which must
 * count unhealthy instances too (else a node that recovers never brings its services back).
 */
export function servicesAffectedByChecks(
  before: ReadonlyMap<string, CheckState>,
  after: ReadonlyMap<string, CheckState>,
  nodesOf: (service: string) => readonly string[],
  known: readonly string[],
): Set<string> {
  const affected = new Set<string>();
  const touch = (c: CheckState): void => {
    if (c.service !== '') {
      affected.add(c.service);
      return;
    }
    for (const s of known) if (nodesOf(s).includes(c.node)) affected.add(s);
  };
  for (const [id, c] of after) {
    const old = before.get(id);
    if (!old || old.status !== c.status || old.modifyIndex !== c.modifyIndex || old.service !== c.service) touch(c);
  }
  for (const [id, c] of before) if (!after.has(id)) touch(c);
  return affected;
}
