import type { Agent } from '../../agent/agent.js';
import type { ServiceStatus } from '../../agent/balancer/status.js';
import type { TestConsul } from './consul.js';

/** What a running agent's /health answers: the HTTP status and the body. */
export interface Health {
  code: number;
  status: string;
  reasons: { code: string; service?: string; message: string }[];
}

export async function health(agent: Agent): Promise<Health> {
  const res = await fetch(`http://127.0.0.1:${agent.config.admin!.port}/health`);
  const body = (await res.json()) as Omit<Health, 'code'>;
  return { code: res.status, ...body };
}

/** What the in-process balancer serves now, by service. */
export function served(agent: Agent): Map<string, ServiceStatus> {
  return new Map(agent.dataPlane!.balancer.snapshot().map((s) => [s.service, s]));
}

export function listening(agent: Agent, service: string): boolean {
  return served(agent).get(service)?.listening === true;
}

/** The address table in Consul KV (loopmesh/addresses), or undefined when the key is missing. */
export async function kvTable(consul: TestConsul): Promise<Record<string, string> | undefined> {
  const res = await fetch(`${consul.url}/v1/kv/loopmesh/addresses?raw`);
  if (res.status === 404) return undefined;
  return ((await res.json()) as { addresses: Record<string, string> }).addresses;
}
