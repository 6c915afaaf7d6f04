// The README's screenshot of the status page: a real Balancer (a split service, a backend on a dead
// port that gets ejected, a draining backend (weight 0), gateways) behind a real AdminServer, opened in Debian's
// chromium. Run: node --import tsx scripts/status-page-screenshot.mjs [docs/status-page.png]
import { writeFile, mkdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { chromium } from 'playwright-core';
import { AdminServer } from '../agent/admin/server.ts';
import { routeReport } from '../agent/admin/report.ts';
import { Balancer } from '../agent/balancer/balancer.ts';
import { codes } from '../agent/errors.ts';
import { silentLogger } from '../agent/log.ts';
import { freePort, openConnection, startIdServer, whoAnswers } from '../test/support/net.ts';

const out = process.argv[2] ?? join(import.meta.dirname, '..', 'docs', 'status-page.png');
const servers = await Promise.all(['web-1', 'web-3', 'api-1', 'api-2', 'pay-1', 'pay-2', 'gw-1', 'gw-2'].map((id) => startIdServer(id)));
const port = Object.fromEntries(servers.map((s) => [s.id, s.port]));
const dead = await freePort();
const at = async (n) => ({ address: `127.80.0.${n}`, port: await freePort(`127.80.0.${n}`) });
const b = (id, p, extra = {}) => ({ id, address: '127.0.0.1', port: p, ...extra });
const specs = [
  { service: 'web', name: 'web', fqdn: 'web.local', ...(await at(10)), policy: 'p2c-ewma', empty: 'reject', backends: [b('node-a/web-1', port['web-1'], { subset: 'stable' }), b('node-c/web-3', port['web-3'], { subset: 'canary' })], split: [{ name: 'stable', weight: 90 }, { name: 'canary', weight: 10 }] },
  { service: 'api', name: 'api', fqdn: 'api.local', ...(await at(11)), policy: 'round-robin', empty: 'reject', backends: [b('node-a/api-1', port['api-1']), b('node-b/api-2', port['api-2']), b('node-c/api-3', dead)], outlier: { baseEjectionMs: 30_000 } },
  { service: 'payments', name: 'payments', fqdn: 'payments.local', ...(await at(13)), policy: 'round-robin', empty: 'reject', backends: [b('node-d/payments-1', port['pay-1']), b('node-e/payments-2', port['pay-2'], { weight: 0 })], gateways: [b('gw-1/loopmesh-gateway', port['gw-1']), b('gw-2/loopmesh-gateway', port['gw-2'])] },
];
const balancer = new Balancer({ logger: silentLogger(), connectTimeoutMs: 1000 });
const applied = await balancer.apply({ version: 1, services: specs });
if (applied.failed.length > 0) throw new Error(`cannot listen: ${JSON.stringify(applied.failed)}`);
for (let i = 0; i < 60; i++) await whoAnswers(specs[0].address, specs[0].port);
for (let i = 0; i < 12; i++) await whoAnswers(specs[1].address, specs[1].port);
for (let i = 0; i < 9; i++) await whoAnswers(specs[2].address, specs[2].port);
const held = await Promise.all([1, 2, 3].map(() => openConnection(specs[0].address, specs[0].port)));

const startedAt = Date.now() - 42_000;
const problem = { service: 'Billing_v2', code: codes.planInvalidName, message: 'service name "Billing_v2" cannot be a DNS label: it has characters outside the set; expected letters, digits and hyphens' };
const admin = new AdminServer({
  endpoint: { host: '127.0.0.1', port: 0 },
  logger: silentLogger(),
  report: () => routeReport({ node: 'node-a', consul: { connected: true, lastContactAt: Date.now() - 400, lastError: undefined, errors: {} }, lastRenderAt: startedAt, specs, served: balancer.snapshot(), problems: [problem], health: { status: 'degraded', reasons: [problem] }, dns: undefined }),
});
await admin.start();
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM_BIN ?? '/usr/bin/chromium', args: [...(process.getuid?.() === 0 ? ['--no-sandbox'] : [])] });
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  await page.goto(`${admin.url()}/`);
  const png = await page.screenshot({ type: 'png', fullPage: true });
  await mkdir(dirname(out), { recursive: true });
  await writeFile(out, png);
  process.stdout.write(`${out}: ${png.length} bytes\n`);
  if (png.length > 200 * 1024) process.stderr.write(`warning: ${out} is over 200 KB; keep the README's image small\n`);
} finally {
  await browser.close();
  for (const c of held) c.socket.destroy();
  await admin.close();
  await balancer.close();
  await Promise.all(servers.map((s) => s.close()));
}
