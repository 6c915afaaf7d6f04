import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { writeFile } from 'node:fs/promises';
import { execa } from 'execa';
import { chromium, type Browser } from 'playwright-core';
import { AdminServer } from '../../agent/admin/server.js';
import { routeReport, type StatusReport } from '../../agent/admin/report.js';
import { prefersHtml, statusPage } from '../../agent/admin/page.js';
import { Balancer } from '../../agent/balancer/balancer.js';
import type { ServiceSpec } from '../../agent/contract/balancer-config.js';
import { codes, type Problem } from '../../agent/errors.js';
import { silentLogger } from '../../agent/log.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';

/**
 * The status page at / on the admin port, opened in Debian's chromium: a real AdminServer fed by the
 * report of a real Balancer (a split service, a service with one backend on a dead port, ejected).
 * LOOPMESH_STATUS_PAGE_PNG=path also writes the screenshot there.
 */

const chromiumPath = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const hostile = '<img src=x onerror=alert(1)>';
const browserAccept = 'text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8';

function get(port: number, path: string, accept: string | undefined): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, headers: accept === undefined ? {} : { accept }, timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

test('prefersHtml: a browser gets HTML; curl, no header, a tie or text/plain first gets plain text', () => {
  assert.equal(prefersHtml(browserAccept), true);
  assert.equal(prefersHtml('text/html'), true);
  assert.equal(prefersHtml('text/*;q=0.5, text/html'), true);
  assert.equal(prefersHtml('*/*'), false, "curl's default");
  assert.equal(prefersHtml(undefined), false);
  assert.equal(prefersHtml(''), false);
  assert.equal(prefersHtml('text/plain'), false);
  assert.equal(prefersHtml('text/html;q=0.5, text/plain'), false);
  assert.equal(prefersHtml('text/html, text/plain'), false, 'a tie keeps plain text');
  assert.equal(prefersHtml('application/json'), false);
  assert.equal(prefersHtml('text/html;q=0'), false);
});

test('statusPage escapes every value from the report', () => {
  const now = Date.now();
  const report: StatusReport = {
    node: `node"><script>alert(1)</script>`,
    consul: { connected: false, lastContactAt: now - 61_000, lastError: { code: 'LM_ERR_CONSUL_HTTP', message: `bad ${hostile}`, at: now - 2000 }, errors: { [`<b>x</b>`]: 2 } },
    lastRenderAt: now - 5000,
    dataPlane: 'in-process',
    routes: [{ service: `a'b"c<d>`, name: 'x', fqdn: 'x.local', address: '127.0.0.9', port: 80, activeConnections: 0, totalConnections: 0, failedConnections: 0, retries: 0, queuedConnections: 0, refusedConnections: 0, gatewayConnections: 0, unreachable: false, panic: false, listening: true, healthyBackends: 1, backends: [{ id: `n/<i>`, address: '127.0.0.1', port: 1, weight: 1, subset: '<u>', activeConnections: 0, totalConnections: 0, failedConnects: 0, resetsBeforeFirstByte: 0, ejectionsTotal: 0 }], gateways: [], split: [{ name: '<s>', weight: 100, connections: 0 }] }],
    problems: [{ service: hostile, code: '<code>', message: hostile }],
    health: { status: 'degraded', reasons: [{ code: 'X', message: hostile }] },
  };
  const html = statusPage(report, now);
  for (const bad of ['<img', '<script>alert', '<b>x', '<i>', '<u>', '<s>', `a'b"c`, '<code>&lt;']) assert.ok(!html.includes(bad), `raw ${bad} in the page`);
  assert.ok(html.includes('&#60;img src=x onerror=alert(1)&#62;'));
  assert.equal(html.match(/<script>/g)?.length, 1, 'the page has only its own script');
  assert.match(html, /UNREACHABLE/);
  assert.match(html, /1 min 1 s ago/);
  // A time that is not one (NaN, out of range) shows "?", not a 500.
  const odd = statusPage({ ...report, lastRenderAt: Number.NaN, consul: { ...report.consul!, lastContactAt: 1e20 } }, now);
  assert.match(odd, /Last render<\/dt><dd>\?/);
});

test('statusPage: past 20 services only those that need a look are open; size and time at 2,000 x 5', () => {
  const now = Date.now();
  const route = (i: number, backends: number): StatusReport['routes'][number] => ({
    service: `svc-${i}`, name: `svc-${i}`, fqdn: `svc-${i}.local`, address: `127.1.${i >> 8}.${i & 255}`, port: 80, activeConnections: 0, totalConnections: 0, failedConnections: 0, retries: 0, queuedConnections: 0, refusedConnections: 0, gatewayConnections: 0, unreachable: false, panic: false, listening: true, healthyBackends: backends,
    backends: Array.from({ length: backends }, (_, j) => ({ id: `node-${j}/svc-${i}`, address: `10.0.${j}.${i & 255}`, port: 8080, weight: 1, subset: '', activeConnections: 0, totalConnections: 0, failedConnects: 0, resetsBeforeFirstByte: 0, ejectionsTotal: 0 })),
    gateways: [],
  });
  const report = (n: number, perService: number): StatusReport => ({ node: 'n', consul: null, lastRenderAt: now, dataPlane: 'in-process', routes: Array.from({ length: n }, (_, i) => route(i, i === 3 ? 0 : perService)), problems: [], health: { status: 'ok', reasons: [] } });
  const few = statusPage(report(5, 2), now);
  assert.equal(few.match(/<details [^>]* open>/g)?.length, 5);
  const many = statusPage(report(25, 2), now);
  assert.deepEqual(many.match(/data-key="[^"]*"(?= [^>]* open>)/g), ['data-key="svc-3"'], 'only the service with no backends is open');
  const t0 = performance.now();
  const big = statusPage(report(2000, 5), now);
  const ms = performance.now() - t0;
  process.stdout.write(`# status page at 2,000 services x 5 backends: ${(Buffer.byteLength(big) / 1024 / 1024).toFixed(2)} MB, rendered in ${ms.toFixed(0)} ms\n`);
  assert.ok(ms < 5000, `${ms} ms`);
});

describe('the status page in a real browser', { timeout: 60_000 }, () => {
  const backends: IdServer[] = [];
  let balancer: Balancer;
  let admin: AdminServer;
  let adminPort: number;
  let specs: ServiceSpec[];
  let rendered = 0;
  let browser: Browser | undefined;
  let browserError = '';
  const problem: Problem = { service: hostile, code: codes.planInvalidName, message: `service "${hostile}" has an invalid name; expected letters, digits and hyphens` };

  before(async () => {
    const [v1, v2, apiA, gw] = await Promise.all([startIdServer('web-v1'), startIdServer('web-v2'), startIdServer('api-a'), startIdServer('gw-1')]);
    backends.push(v1!, v2!, apiA!, gw!);
    const deadPort = await freePort();
    const webAddress = '127.79.0.10';
    const apiAddress = '127.79.0.11';
    specs = [
      { service: 'web', name: 'web', fqdn: 'web.local', address: webAddress, port: await freePort(webAddress), policy: 'round-robin', empty: 'reject', backends: [{ id: 'node-a/web-1', address: '127.0.0.1', port: v1!.port, subset: 'v1' }, { id: 'node-b/web-2', address: '127.0.0.1', port: v2!.port, subset: 'v2' }], split: [{ name: 'v1', weight: 90 }, { name: 'v2', weight: 10 }] },
      {
        service: 'api', name: 'api', fqdn: 'api.local', address: apiAddress, port: await freePort(apiAddress), policy: 'round-robin', empty: 'reject',
        backends: [{ id: 'node-a/api-1', address: '127.0.0.1', port: apiA!.port }, { id: 'node-c/api-2', address: '127.0.0.1', port: deadPort }],
        outlier: { consecutiveFailures: 1, baseEjectionMs: 60_000, maxEjectionMs: 120_000, panicThresholdPercent: 0 },
        gateways: [{ id: 'gw-node/loopmesh-gateway', address: '127.0.0.1', port: gw!.port }],
      },
    ];
    balancer = new Balancer({ logger: silentLogger(), connectTimeoutMs: 1000 });
    const applied = await balancer.apply({ version: 1, services: specs });
    assert.deepEqual(applied.failed, []);
    // Traffic: the split gets connections, and api's dead backend fails a connect and is ejected.
    for (let i = 0; i < 10; i++) assert.match(await whoAnswers(webAddress, specs[0]!.port), /^web-v[12]$/);
    for (let i = 0; i < 4; i++) assert.equal(await whoAnswers(apiAddress, specs[1]!.port), 'api-a');
    await eventually(() => balancer.snapshot().find((s) => s.service === 'api')?.backends.find((b) => b.id === 'node-c/api-2')?.ejectedUntil, 5000, 'api-2 ejected');
    const startedAt = Date.now();
    admin = new AdminServer({
      endpoint: { host: '127.0.0.1', port: 0 },
      logger: silentLogger(),
      report: () => {
        rendered++;
        return routeReport({
          node: 'node-a',
          consul: { connected: true, lastContactAt: Date.now() - 800, lastError: undefined, errors: {} },
          lastRenderAt: startedAt,
          specs,
          served: balancer.snapshot(),
          problems: [problem],
          health: { status: 'ok', reasons: [] },
          dns: undefined,
        });
      },
    });
    await admin.start();
    adminPort = Number(new URL(admin.url()).port);
    try {
      browser = await chromium.launch({ executablePath: chromiumPath, args: process.getuid?.() === 0 ? ['--no-sandbox'] : [], timeout: 15_000 });
    } catch (err) {
      browserError = err instanceof Error ? err.message.split('\n')[0]! : String(err);
    }
  });

  after(async () => {
    await browser?.close();
    await admin?.close();
    await balancer?.close();
    await Promise.all(backends.map((b) => b.close()));
  });

  test('curl (Accept: */*) and no Accept get the plain text; a browser Accept gets HTML with a strict CSP', async () => {
    const curl = await execa('curl', ['-sS', '-D', '-', `http://127.0.0.1:${adminPort}/`], { reject: false, timeout: 10_000 });
    assert.equal(curl.exitCode, 0, curl.stderr);
    assert.match(curl.stdout, /^content-type: text\/plain; charset=utf-8\r?$/im);
    assert.match(curl.stdout, /^loopmesh on node-a: consul connected$/m);
    assert.match(curl.stdout, /^web\.local {2}127\.79\.0\.10:\d+ {2}2 backend\(s\) {2}listening$/m);
    assert.doesNotMatch(curl.stdout, /<html/i);
    const none = await get(adminPort, '/', undefined);
    assert.equal(none.headers['content-type'], 'text/plain; charset=utf-8');
    const html = await get(adminPort, '/', browserAccept);
    assert.equal(html.status, 200);
    assert.equal(html.headers['content-type'], 'text/html; charset=utf-8');
    assert.equal(html.headers.vary, 'accept');
    const csp = String(html.headers['content-security-policy']);
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /script-src 'sha256-[A-Za-z0-9+/]+=*'(;|$)/);
    assert.doesNotMatch(csp, /unsafe|https?:|\*/);
    assert.match(html.body, /^<!doctype html>/);
    // The rebinding check stays in front of the page.
    const rebound = await new Promise<number>((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port: adminPort, path: '/', headers: { host: 'evil.example', accept: browserAccept } }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', reject);
      req.end();
    });
    assert.equal(rebound, 421);
  });

  test('chromium shows services, backends, the ejection and the split; hostile text stays text; the page refreshes itself', async (t) => {
    if (!browser) return t.skip(`chromium cannot start: ${browserError}`);
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const dialogs: string[] = [];
    const consoleErrors: string[] = [];
    page.on('dialog', (d) => {
      dialogs.push(d.message());
      void d.dismiss();
    });
    page.on('console', (m) => {
      if (m.type() === 'error' && !/favicon/.test(m.text())) consoleErrors.push(m.text());
    });
    page.on('pageerror', (err) => consoleErrors.push(err.message));
    // The page's timers run on a controlled clock: no waiting 5 s for each refresh.
    await page.clock.install();
    const started = Date.now();
    const response = await page.goto(`http://127.0.0.1:${adminPort}/`);
    assert.equal(response?.headers()['content-type'], 'text/html; charset=utf-8');
    // textContent: what the page holds, closed services included; innerText: what is visible now.
    const text = String(await page.evaluate('document.body.textContent'));
    const visible = String(await page.evaluate('document.body.innerText'));
    assert.match(text, /loopmesh on node-a/);
    assert.match(text, /web\.local/);
    assert.match(text, /api\.local/);
    assert.match(text, /node-a\/web-1/);
    assert.match(text, /node-c\/api-2/);
    assert.match(text, /gw-node\/loopmesh-gateway/);
    const states = (await page.evaluate(`[...document.querySelectorAll('tr.backend')].map((r) => r.cells[0].textContent + ' ' + r.dataset.state + ' ' + r.cells[3].textContent)`)) as string[];
    assert.ok(states.some((s) => /^node-c\/api-2 ejected connect failures .*tried again in \d/.test(s)), JSON.stringify(states));
    assert.ok(states.some((s) => /^node-a\/api-1 up/.test(s)), JSON.stringify(states));
    assert.ok(states.some((s) => /^node-a\/web-1 up/.test(s)), JSON.stringify(states));
    const split = (await page.evaluate(`[...document.querySelectorAll('table.split tr.subset')].map((r) => [...r.cells].map((c) => c.textContent.trim()).filter((c) => c !== '').join(' '))`)) as string[];
    assert.equal(split.length, 2, JSON.stringify(split));
    assert.match(split[0]!, /^v1 90 % \d+/);
    assert.match(split[1]!, /^v2 10 % \d+/);
    // Few services: all open; api is marked as needing a look (an ejected backend), web is not.
    assert.deepEqual(await page.evaluate(`[...document.querySelectorAll('details.service')].map((d) => d.dataset.key + ' open=' + d.open + ' trouble=' + d.dataset.trouble)`), ['web open=true trouble=false', 'api open=true trouble=true']);
    // The hostile name is shown as text, and no markup of it exists.
    assert.ok(visible.includes(`service "${hostile}" has an invalid name`), 'the hostile text is shown as text');
    assert.match(visible, /node-c\/api-2\s+127\.0\.0\.1:\d+\s+ejected/, 'the ejected backend is visible without a click');
    assert.equal(await page.evaluate(`document.querySelectorAll('img').length`), 0);
    assert.equal(await page.evaluate(`document.querySelectorAll('script').length`), 1);
    // The self-refresh: the script (allowed by its hash) fetches the page again and says so.
    const before = rendered;
    const firstNow = String(await page.evaluate('document.body.dataset.now'));
    assert.match(String(await page.evaluate(`document.getElementById('live').textContent`)), /^live: fetched \d+ m?s ago, every 5 s$/, 'the script runs');
    await page.clock.runFor(5_100);
    // (Polled with evaluate: the page's CSP refuses waitForFunction's string eval, as it should.)
    await eventually(async () => String(await page.evaluate('document.body.dataset.now')) !== firstNow, 10_000, 'the page to swap in a newer render');
    assert.ok(rendered > before, `the page fetched / again (${before} -> ${rendered} reports)`);
    assert.match(String(await page.evaluate(`document.getElementById('node').textContent`)), /^node-a$/);
    assert.deepEqual(dialogs, [], 'no dialog fired');
    assert.deepEqual(consoleErrors, [], 'no CSP violation or script error');
    process.stdout.write(`# status page: loaded and refreshed once in ${Date.now() - started} ms\n`);

    // The screenshot: not blank (differs from an empty page, many colours, counted by the browser's canvas).
    const png = await page.screenshot({ type: 'png' });
    const blankPage = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const blank = await blankPage.screenshot({ type: 'png' });
    assert.ok(!png.equals(blank), 'the screenshot differs from an empty page');
    const colours = Number(
      await blankPage.evaluate(`(async () => {
        const img = new Image();
        img.src = 'data:image/png;base64,${png.toString('base64')}';
        await img.decode();
        const c = document.createElement('canvas');
        c.width = img.width; c.height = img.height;
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        let ink = 0;
        for (let i = 0; i < d.length; i += 4) {
          seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
          if (d[i] < 128 && d[i + 1] < 128 && d[i + 2] < 128) ink++;
        }
        return seen.size * 1e6 + Math.min(ink, 999999);
      })()`),
    );
    const distinct = Math.floor(colours / 1e6);
    const ink = colours % 1e6;
    process.stdout.write(`# screenshot: ${png.length} bytes, ${distinct} distinct colours, ${ink} dark pixels\n`);
    assert.ok(distinct >= 16, `${distinct} distinct colours`);
    assert.ok(ink >= 2000, `${ink} dark pixels (text)`);
    if (process.env.LOOPMESH_STATUS_PAGE_PNG) await writeFile(process.env.LOOPMESH_STATUS_PAGE_PNG, png);
    await blankPage.close();

    // The filter narrows the list by name, and a refresh keeps it.
    await page.fill('#filter', 'api');
    const shown = `[...document.querySelectorAll('details.service')].filter((d) => !d.hidden).map((d) => d.dataset.key)`;
    assert.deepEqual(await page.evaluate(shown), ['api']);
    const beforeSwap = String(await page.evaluate('document.body.dataset.now'));
    await page.clock.runFor(5_100);
    await eventually(async () => String(await page.evaluate('document.body.dataset.now')) !== beforeSwap, 10_000, 'another refresh');
    assert.equal(await page.evaluate(`document.getElementById('filter').value`), 'api');
    assert.deepEqual(await page.evaluate(shown), ['api']);

    // Staleness: the admin stops answering; the page keeps what it showed, and says so.
    await admin.close();
    await page.clock.runFor(5_100);
    const live = await eventually(async () => {
      const text = String(await page.evaluate(`document.getElementById('live').textContent`));
      return /^admin not answering/.test(text) ? text : undefined;
    }, 10_000, 'the page to say the admin does not answer');
    assert.match(live, /^admin not answering \(.+\) since \d+ (ms|s): what you see is that old$/);
    assert.equal(await page.evaluate(`document.body.classList.contains('stale')`), true);
    assert.match(String(await page.evaluate('document.body.textContent')), /node-c\/api-2/, 'the last page stays');
    await page.close();
  });
});
