/**
 * node --import tsx test/bench/metrics-scrape.ts [ROUTES]: the cost of one /metrics scrape for a
 * synthetic report of ROUTES services x 5 backends (default 2,000): the whole scrape, the longest
 * the event loop was held meanwhile (the gap of a 1 ms timer), and the size. Median of 3.
 */
import { Metrics } from '../../agent/admin/metrics.js';
import { emptyLatency } from '../../agent/balancer/latency.js';
const S = Number(process.argv[2] ?? 2000), B = 5;
const routes = Array.from({ length: S }, (_, i) => ({ service: `svc-${i}`, name: `svc-${i}`, fqdn: `svc-${i}.local`, address: '127.1.1.1', port: 80, listening: true, healthyBackends: B, activeConnections: 1, totalConnections: 100, failedConnections: 0, retries: 0, queuedConnections: 0, refusedConnections: 0, panic: false, unreachable: false, gatewayConnections: 0, gateways: [], connectLatency: emptyLatency(), bytesIn: 5, bytesOut: 7,
  backends: Array.from({ length: B }, (_, j) => ({ id: `b${j}`, address: '10.0.0.1', port: 1000 + j, weight: 1, subset: '', activeConnections: 0, totalConnections: 20, failedConnects: 2, connectTimeouts: 1, resetsBeforeFirstByte: 0, ejectionsTotal: 0, bytesIn: 5, bytesOut: 7 })) }));
const report = { node: 'n', consul: null, lastRenderAt: undefined, dataPlane: 'in-process' as const, routes, problems: [], health: { status: 'ok' as const, reasons: [] } };
const m = new Metrics();
/** The longest gap between two ticks of a 1 ms timer while f runs: how long the event loop was held. */
async function held(f: () => Promise<string>): Promise<[number, number, number]> {
  let last = performance.now(); let worst = 0;
  const timer = setInterval(() => { const now = performance.now(); worst = Math.max(worst, now - last); last = now; }, 1);
  const t0 = performance.now(); const text = await f(); const total = performance.now() - t0;
  const now = performance.now(); worst = Math.max(worst, now - last);
  clearInterval(timer);
  return [total, worst, text.length];
}
for (const [name, f] of [['prom-client', () => m.text(report as never)]] as const) {
  await held(f);
  const r: [number, number, number][] = [];
  for (let i = 0; i < 3; i++) r.push(await held(f));
  r.sort((a, b) => a[0] - b[0]);
  const [total, worst, len] = r[1]!;
  process.stdout.write(`${name}: ${S} x ${B}: scrape ${total.toFixed(0)} ms, event loop held at most ${worst.toFixed(0)} ms, ${(len / 1024).toFixed(0)} KiB\n`);
}
