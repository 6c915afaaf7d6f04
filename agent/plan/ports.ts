import type { Instance } from '../consul/catalog.js';

export const portMetaKey = 'loopmesh-port';

export type PortResult = { ok: true; port: number; source: 'meta' | 'instances' } | { ok: false; reason: string };

function mostCommon(values: readonly number[]): number | undefined {
  const counts = new Map<number, number>();
  for (const v of values) counts.set(v, (counts.get(v) ?? 0) + 1);
  let best: number | undefined;
  let bestCount = 0;
  for (const [v, c] of counts) {
    // Ties go to the lowest port, so every node picks the same one.
    if (c > bestCount || (c === bestCount && best !== undefined && v < best)) {
      best = v;
      bestCount = c;
    }
  }
  return best;
}

/** The port NAME.local listens on: meta `loopmesh-port`, else the port the instances agree on. */
export function choosePort(instances: readonly Instance[], previous?: number): PortResult {
  const fromMeta: number[] = [];
  const bad: string[] = [];
  for (const i of instances) {
    const raw = i.meta[portMetaKey];
    if (raw === undefined) continue;
    const port = /^\d{1,5}$/.test(raw) ? Number(raw) : NaN;
    if (port >= 1 && port <= 65535) fromMeta.push(port);
    else bad.push(`${i.id} has ${portMetaKey}=${JSON.stringify(raw)}`);
  }
  const meta = mostCommon(fromMeta);
  if (meta !== undefined) return { ok: true, port: meta, source: 'meta' };
  const natural = mostCommon(instances.map((i) => i.port));
  if (natural !== undefined) return { ok: true, port: natural, source: 'instances' };
  // No healthy instance to ask: keep the port the route already had.
  if (previous !== undefined) return { ok: true, port: previous, source: 'instances' };
  if (bad.length > 0) return { ok: false, reason: `expected ${portMetaKey} to be a port from 1 to 65535: ${bad.join('; ')}` };
  return { ok: false, reason: `no healthy instance to take a port from, and no ${portMetaKey} meta` };
}
