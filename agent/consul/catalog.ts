import { describe, isRecord } from '../validate.js';

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
}

/** Service name -> its healthy instances, sorted by id. Services with none are kept, with []. */
export type Catalog = ReadonlyMap<string, readonly Instance[]>;

export interface HealthFilter {
  /** Count instances whose worst check is "warning" as healthy. */
  allowWarning: boolean;
}

/** Where data from Consul is rejected, and why; reported, never thrown at the rest of the agent. */
export interface CatalogProblem {
  service: string;
  message: string;
}

const statusRank: Record<string, number> = { passing: 0, warning: 1, critical: 2, maintenance: 3 };

function stringRecord(value: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (!isRecord(value)) return out;
  for (const [k, v] of Object.entries(value)) if (typeof v === 'string') out[k] = v;
  return out;
}

/**
 * /v1/health/service/NAME -> healthy instances. Entries that do not have the shape Consul documents
 * are skipped and reported, so one bad registration never hides the good ones.
 */
export function parseHealthService(
  service: string,
  body: unknown,
  filter: HealthFilter,
): { instances: Instance[]; nodes: string[]; problems: CatalogProblem[] } {
  const problems: CatalogProblem[] = [];
  const nodes = new Set<string>();
  if (!Array.isArray(body)) {
    return { instances: [], nodes: [], problems: [{ service, message: `health/service/${service}: expected an array, got ${describe(body)}` }] };
  }
  const instances: Instance[] = [];
  body.forEach((entry, i) => {
    const where = `health/service/${service}[${i}]`;
    if (!isRecord(entry) || !isRecord(entry.Node) || !isRecord(entry.Service)) {
      problems.push({ service, message: `${where}: expected an object with Node and Service, got ${describe(entry)}` });
      return;
    }
    const node = entry.Node;
    const svc = entry.Service;
    const port = svc.Port;
    const address = typeof svc.Address === 'string' && svc.Address !== '' ? svc.Address : node.Address;
    if (typeof node.Node !== 'string' || typeof svc.ID !== 'string') {
      problems.push({ service, message: `${where}: expected string Node.Node and Service.ID` });
      return;
    }
    // Every node with an instance, healthy or not: a node-level check there (serfHealth) turning
    // passing again must bring this service's instances back, so the watcher has to know of them.
    if (typeof svc.Service !== 'string' || svc.Service === service) nodes.add(node.Node);
    if (typeof address !== 'string' || address === '') {
      problems.push({ service, message: `${where} (${svc.ID} on ${node.Node}): expected an address, got ${describe(address)}` });
      return;
    }
    if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) {
      problems.push({ service, message: `${where} (${svc.ID} on ${node.Node}): expected a port from 1 to 65535, got ${describe(port)}` });
      return;
    }
    let worst = 0;
    for (const check of Array.isArray(entry.Checks) ? entry.Checks : []) {
      const status = isRecord(check) && typeof check.Status === 'string' ? check.Status : 'critical';
      worst = Math.max(worst, statusRank[status] ?? 2);
    }
    if (worst > (filter.allowWarning ? 1 : 0)) return;
    // Consul matches service names case-insensitively here: /health/service/api also returns "API".
    // Those belong to the other service (which the planner reports as a collision), not to this one.
    if (typeof svc.Service === 'string' && svc.Service !== service) return;
    instances.push({
      id: `${node.Node}/${svc.ID}`,
      node: node.Node,
      address,
      port,
      datacenter: typeof node.Datacenter === 'string' ? node.Datacenter : '',
      tags: Array.isArray(svc.Tags) ? svc.Tags.filter((t): t is string => typeof t === 'string') : [],
      meta: stringRecord(svc.Meta),
      status: worst === 0 ? 'passing' : 'warning',
    });
  });
  instances.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  return { instances, nodes: [...nodes].sort(), problems };
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
}

/** Which services this node routes: never Consul itself, then the configured names and tag. */
export function selectServices(all: ReadonlyMap<string, readonly string[]>, selection: ServiceSelection): string[] {
  return [...all.entries()]
    .filter(([name]) => name !== 'consul')
    .filter(([name]) => selection.services.length === 0 || selection.services.includes(name))
    .filter(([, tags]) => selection.tag === undefined || tags.includes(selection.tag))
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
