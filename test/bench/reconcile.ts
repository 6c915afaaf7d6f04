/**
 * node --import tsx test/bench/reconcile.ts [--services S --instances I --changes N --json]: what the
 * agent's own work for one change costs at catalog scale, without Consul: the plan, the render, the
 * writes and the in-process data plane's reload (balancer, hosts block), phase by phase, over N
 * changes of one service each (a flip: one instance fewer, then back). The same steps as the agent's
 * reconcile: the data plane serves what was rendered, then the files are written. bench:converge
 * measures the whole path with a real Consul.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Catalog, Instance } from '../../agent/consul/catalog.js';
import { DataPlane } from '../../agent/data-plane/data-plane.js';
import { balancerFile } from '../../agent/contract/files.js';
import { silentLogger } from '../../agent/log.js';
import { allocate, parseRange } from '../../agent/plan/addresses.js';
import { plan, planLabels, PlanMemo, type Route } from '../../agent/plan/plan.js';
import { renderAll, writeRendered } from '../../agent/render/render.js';
import { builtinTemplatesDir, loadTemplates } from '../../agent/render/templates.js';
import { wholeNumberFlag } from '../support/bench-flags.js';

const argv = process.argv.slice(2);
const flag = (name: string, fallback: number): number => wholeNumberFlag('bench:reconcile', argv, name, fallback);
const S = flag('services', 2000);
const I = flag('instances', 5);
const N = flag('changes', 40);
const jsonOut = argv.includes('--json');

function instance(s: number, i: number): Instance {
  return { id: `node${i}/svc${s}-${i}`, node: `node${i}`, address: `10.1.${i}.${(s % 250) + 1}`, port: 20000 + (s % 1000), datacenter: 'dc1', tags: ['v1'], meta: { version: '1' }, status: 'passing', weight: 1 };
}

const dir = await mkdtemp(join(tmpdir(), 'lm-bench-reconcile-'));
const runDir = join(dir, 'run');
const hostsFile = join(dir, 'hosts');
await writeFile(hostsFile, '127.0.0.1 localhost\n');
const range = parseRange('127.77.0.0/16');
const logger = silentLogger();
const { templates } = await loadTemplates([builtinTemplatesDir()]);
const plane = new DataPlane({ runDir, logger, suffix: 'local', dns: undefined, hostsFile, connectTimeoutMs: 1000, drainTimeoutMs: 1000 });
await plane.start();

const catalog = new Map<string, readonly Instance[]>();
for (let s = 0; s < S; s++) catalog.set(`svc${s}`, Array.from({ length: I }, (_, i) => instance(s, i)));
const { labels } = planLabels([...catalog.keys()]);
const { table } = allocate({}, [...labels.values()], range);
const memo = new PlanMemo();
let routes: Route[] = [];
const phases = ['plan', 'render', 'serve', 'write', 'served', 'total'] as const;
const samples: Record<(typeof phases)[number], number[]> = { plan: [], render: [], serve: [], write: [], served: [], total: [] };

async function once(record: boolean): Promise<void> {
  const t0 = performance.now();
  const planned = plan(catalog, table, routes, { suffix: 'local', empty: 'reject', range, memo });
  const t1 = performance.now();
  const serving = (t: { output: string }): boolean => t.output === balancerFile || t.output === 'hosts';
  const rendered = renderAll(templates.filter(serving), { routes: planned.routes, suffix: 'local' });
  const t2 = performance.now();
  const balancer = rendered.files.find((f) => f.output === balancerFile && f.config !== undefined);
  const hosts = rendered.files.find((f) => f.output === 'hosts');
  if (!balancer?.config) throw new Error('balancer.json did not render');
  await plane.reload({ balancer: { text: balancer.text, config: balancer.config }, hosts: hosts?.text });
  const t3 = performance.now();
  const others = renderAll(templates.filter((t) => !serving(t)), { routes: planned.routes, suffix: 'local' });
  await writeRendered(runDir, [...rendered.files, ...others.files]);
  const t4 = performance.now();
  routes = planned.routes;
  if (!record) return;
  samples.plan.push(t1 - t0);
  samples.render.push(t2 - t1);
  samples.serve.push(t3 - t2);
  samples.write.push(t4 - t3);
  samples.served.push(t3 - t0);
  samples.total.push(t4 - t0);
}

const firstStart = performance.now();
await once(false);
const first = performance.now() - firstStart;
for (let c = 0; c < N; c++) {
  const s = (c * 7919) % S;
  const all = Array.from({ length: I }, (_, i) => instance(s, i));
  // A flip: the first instance leaves the healthy set, and comes back on the next change of it.
  const current = catalog.get(`svc${s}`) ?? [];
  catalog.set(`svc${s}`, current.length === I ? all.slice(1) : all);
  await once(true);
}
await plane.close();
await rm(dir, { recursive: true, force: true });

const pct = (list: number[], p: number): number => {
  const sorted = [...list].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;
};
const result = { services: S, instances: I, changes: N, firstMs: Math.round(first), phases: Object.fromEntries(phases.map((p) => [p, { p50: +pct(samples[p], 50).toFixed(1), p90: +pct(samples[p], 90).toFixed(1), max: +pct(samples[p], 100).toFixed(1) }])) };
if (jsonOut) process.stdout.write(`${JSON.stringify(result)}\n`);
else {
  process.stdout.write(`${S} services x ${I} instances, ${N} changes (one service each); first reconcile ${result.firstMs} ms\n(served: plan + render + serve, the change in service; write: the other templates rendered and every file written)\n\n| phase | p50 ms | p90 | max |\n|---|---|---|---|\n`);
  for (const p of phases) process.stdout.write(`| ${p} | ${result.phases[p]?.p50} | ${result.phases[p]?.p90} | ${result.phases[p]?.max} |\n`);
}
