import type { BackendSpec } from '../contract/balancer-config.js';
import { maxGateways } from '../contract/balancer-config.js';
import type { Instance } from '../consul/catalog.js';
import { codes } from '../errors.js';
import { describe } from '../validate.js';
import { mirrorAddress, parseGatewayRange, type AddressRange } from './addresses.js';

/**
 * The proxy cluster as a node sees it: the healthy instances of the gateway service in Consul, each
 * serving every service at the mirror of its loopback address inside the gateway's own range.
 */

/** The Consul service every `loopmesh gateway` registers as (flag --gateway-service). */
export const defaultGatewayService = 'loopmesh-gateway';
/** Instance meta of a gateway: the range it serves on (its --gateway-range). */
export const gatewayRangeMeta = 'loopmesh-gateway-range';
/** Instance meta of a gateway: the loopback range it mirrors (its --range); must be this node's. */
export const mirroredRangeMeta = 'loopmesh-range';

export interface Gateway {
  /** NODE/SERVICE_ID of its registration. */
  id: string;
  range: AddressRange;
}

export interface GatewayProblem {
  service: string;
  code: string;
  message: string;
}

function overlaps(a: AddressRange, b: AddressRange): boolean {
  return a.first - 1 <= b.last + 1 && b.first - 1 <= a.last + 1;
}

/**
 * The usable gateways among the healthy instances of the gateway service, sorted by id. An instance
 * without a valid range, mirroring another loopback range, or overlapping one already taken is
 * reported (LM_ERR_GATEWAY_INVALID) and left out: the others still serve.
 */
export function gatewaysOf(service: string, instances: readonly Instance[], ownRange: AddressRange): { gateways: Gateway[]; problems: GatewayProblem[] } {
  const gateways: Gateway[] = [];
  const problems: GatewayProblem[] = [];
  const refuse = (instance: Instance, why: string): void => {
    problems.push({ service, code: codes.gatewayInvalid, message: `gateway ${JSON.stringify(instance.id)}: ${why}; not used` });
  };
  for (const instance of [...instances].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))) {
    const cidr = instance.meta[gatewayRangeMeta];
    if (cidr === undefined) {
      refuse(instance, `has no meta ${gatewayRangeMeta}; expected the CIDR range it serves on (loopmesh gateway --gateway-range)`);
      continue;
    }
    let range: AddressRange;
    try {
      range = parseGatewayRange(cidr);
    } catch (err) {
      refuse(instance, `meta ${gatewayRangeMeta} is ${describe(cidr)}: ${(err as Error).message}`);
      continue;
    }
    const mirrored = instance.meta[mirroredRangeMeta];
    if (mirrored !== undefined && mirrored !== ownRange.cidr) {
      refuse(instance, `mirrors the loopback range ${describe(mirrored)}, this node uses ${ownRange.cidr}; expected the same --range on nodes and gateways`);
      continue;
    }
    const clash = gateways.find((g) => overlaps(g.range, range));
    if (clash) {
      refuse(instance, `its range ${range.cidr} overlaps ${clash.range.cidr} of gateway ${JSON.stringify(clash.id)}; expected a range of its own for each gateway`);
      continue;
    }
    if (gateways.length === maxGateways) {
      refuse(instance, `${maxGateways} gateways are in use already`);
      continue;
    }
    gateways.push({ id: instance.id, range });
  }
  return { gateways, problems };
}

/** A small stable hash, so each service starts its gateway list at its own place (spreads the load). */
function spread(name: string, n: number): number {
  let h = 2166136261;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 16777619);
  return (h >>> 0) % n;
}

/** The gateways' addresses for one service (its loopback address mirrored into each gateway's range). */
export function gatewayBackends(gateways: readonly Gateway[], ownRange: AddressRange, service: string, address: string, port: number): BackendSpec[] {
  const out: BackendSpec[] = [];
  for (const g of gateways) {
    const mirrored = mirrorAddress(ownRange, g.range, address);
    if (mirrored !== undefined) out.push({ id: g.id, address: mirrored, port, weight: 1, subset: '' });
  }
  if (out.length < 2) return out;
  const start = spread(service, out.length);
  return [...out.slice(start), ...out.slice(0, start)];
}
