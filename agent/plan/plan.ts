import type { BackendSpec, EmptyPolicy, ServiceSpec } from '../balancer/config.js';
import type { Catalog } from '../consul/catalog.js';
import { codes } from '../errors.js';
import type { AddressTable } from './addresses.js';
import { dnsLabel } from './names.js';
import { choosePort } from './ports.js';

/** A route is what the data plane serves for one service; its shape is balancer.json's. */
export type Route = ServiceSpec;

export interface PlanProblem {
  service: string;
  code: string;
  message: string;
}

export interface PlanOptions {
  suffix: string;
  empty: EmptyPolicy;
}

/**
 * Service names -> DNS labels. A name that cannot be a label, or that maps to the same label as
 * another, is reported and skipped. On a collision the service whose name already is the label
 * keeps it; without one, all of them are skipped, so a newcomer can never take a name in use.
 */
export function planLabels(services: readonly string[]): { labels: Map<string, string>; problems: PlanProblem[] } {
  const problems: PlanProblem[] = [];
  const byLabel = new Map<string, string[]>();
  for (const service of services) {
    const result = dnsLabel(service);
    if (!result.ok) {
      problems.push({ service, code: codes.planInvalidName, message: `service name ${JSON.stringify(service)} cannot be a DNS label: it ${result.reason.startsWith('is ') ? result.reason : `has characters outside the set; ${result.reason}`}` });
      continue;
    }
    byLabel.set(result.label, [...(byLabel.get(result.label) ?? []), service]);
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

/** catalog + addresses -> routes. Pure: the same input gives the same routes on every node. */
export function plan(
  catalog: Catalog,
  addresses: AddressTable,
  previous: readonly Route[],
  options: PlanOptions,
): { routes: Route[]; problems: PlanProblem[] } {
  const { labels, problems } = planLabels([...catalog.keys()]);
  const previousByService = new Map(previous.map((r) => [r.service, r]));
  const routes: Route[] = [];
  for (const [service, label] of labels) {
    const instances = catalog.get(service) ?? [];
    const address = addresses[label];
    if (address === undefined) {
      problems.push({ service, code: codes.planNoAddress, message: `service "${service}" has no address allocated yet (Consul KV not reachable or range exhausted)` });
      continue;
    }
    const port = choosePort(instances, previousByService.get(service)?.port);
    if (!port.ok) {
      problems.push({ service, code: codes.planNoPort, message: `service "${service}": ${port.reason}` });
      continue;
    }
    const backends: BackendSpec[] = instances.map((i) => ({ id: i.id, address: i.address, port: i.port }));
    routes.push({
      service,
      name: label,
      fqdn: `${label}.${options.suffix}`,
      address,
      port: port.port,
      policy: 'round-robin',
      empty: options.empty,
      backends,
    });
  }
  routes.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return { routes, problems };
}
