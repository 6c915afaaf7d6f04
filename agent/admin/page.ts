import { createHash } from 'node:crypto';
import type { BackendReport, RouteReport, StatusReport } from './report.js';

/**
 * The status page at / for people with a browser: one server-rendered HTML document, no build step,
 * no external resources. Every value from the report is untrusted text (service names, ids and problem
 * messages come from Consul) and is HTML-escaped; the only script is the static one below, allowed by
 * its hash in the Content-Security-Policy, so nothing the report carries can run.
 */

/** How often the page fetches itself again; a large catalog (a page of megabytes) less often. */
export const refreshSeconds = 5;
export const largeCatalog = { services: 500, refreshSeconds: 30 };

export function refreshEvery(services: number): number {
  return services >= largeCatalog.services ? largeCatalog.refreshSeconds : refreshSeconds;
}

/** Up to this many services every one is shown open; above it only those that need a look. */
export const openAllUpTo = 20;

/** Text for an HTML text node or a quoted attribute value. */
export function escapeHtml(value: unknown): string {
  // Numbers (most of the page) cannot hold markup; everything else is escaped.
  if (typeof value === 'number') return String(value);
  const text = String(value);
  return special.test(text) ? text.replace(specials, (c) => `&#${c.charCodeAt(0)};`) : text;
}
const special = /[&<>"'`]/;
const specials = /[&<>"'`]/g;

/**
 * Whether an Accept header prefers text/html to text/plain (a browser), by q-value with the most
 * specific matching range (RFC 9110 12.5.1). A tie, no header, or `*\/*` (curl's default) is plain text.
 */
export function prefersHtml(accept: string | undefined): boolean {
  if (!accept) return false;
  const ranges = accept.split(',').map((part) => {
    const [range = '', ...params] = part.split(';').map((s) => s.trim().toLowerCase());
    let q = 1;
    for (const p of params) {
      const m = /^q=([0-9](?:\.[0-9]{0,3})?)$/.exec(p);
      if (m) q = Math.min(1, Number(m[1]));
    }
    return { range, q };
  });
  const quality = (type: string): number => {
    const [major] = type.split('/');
    let best = { specificity: -1, q: 0 };
    for (const { range, q } of ranges) {
      const specificity = range === type ? 2 : range === `${major}/*` ? 1 : range === '*/*' ? 0 : -1;
      if (specificity > best.specificity) best = { specificity, q };
    }
    return best.q;
  };
  return quality('text/html') > quality('text/plain');
}

/** Durations as people read them: 850 ms, 4 s, 2 min 5 s, 3 h 10 min, 2 d 4 h. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return '?';
  const neg = ms < 0;
  const abs = Math.abs(ms);
  const s = Math.floor(abs / 1000);
  const text =
    abs < 1000 ? `${Math.round(abs)} ms`
    : s < 60 ? `${s} s`
    : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s`
    : s < 86400 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
    : `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  return neg ? `-${text}` : text;
}

/** A mean connect time: 0.42 ms, 3.1 ms, 250 ms. */
function meanMs(sumSeconds: number, count: number): string {
  const ms = (sumSeconds * 1000) / count;
  return !Number.isFinite(ms) ? '?' : ms < 1 ? `${ms.toFixed(2)} ms` : ms < 100 ? `${ms.toFixed(1)} ms` : formatDuration(ms);
}

/** 0 B, 512 B, 1.5 KiB, 3.2 MiB, 1.1 GiB. */
export function formatBytes(n: number): string {
  if (!Number.isFinite(n) || n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

// The page's one script: no data in it (so its hash is fixed); it reads data-* attributes. It fetches
// the page again every few seconds and swaps the body (keeping the filter, focus and which services
// are open), updates the "ago" times every second, and says so when the admin stops answering.
const script = `(() => {
  const every = () => Number(document.body.dataset.every) * 1000 || ${refreshSeconds * 1000};
  const toggled = new Map();
  let lastOk = Date.now();
  let failing = '';
  const fmt = (ms) => {
    const a = Math.abs(ms), s = Math.floor(a / 1000), sign = ms < 0 ? '-' : '';
    if (a < 1000) return sign + Math.round(a) + ' ms';
    if (s < 60) return sign + s + ' s';
    if (s < 3600) return sign + Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
    if (s < 86400) return sign + Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
    return sign + Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
  };
  const skew = () => Number(document.body.dataset.now) - Number(document.body.dataset.loaded);
  const tick = () => {
    const now = Date.now() + skew();
    for (const el of document.querySelectorAll('[data-at]')) {
      const at = Number(el.dataset.at);
      el.textContent = el.dataset.dir === 'until' ? (at > now ? 'in ' + fmt(at - now) : 'now') : fmt(now - at) + ' ago';
    }
    const live = document.getElementById('live');
    if (live) live.textContent = failing
      ? 'admin not answering (' + failing + ') since ' + fmt(Date.now() - lastOk) + ': what you see is that old'
      : 'live: fetched ' + fmt(Date.now() - lastOk) + ' ago, every ' + (every() / 1000) + ' s';
    document.body.classList.toggle('stale', failing !== '');
  };
  const filter = () => {
    const input = document.getElementById('filter');
    const text = input ? input.value.trim().toLowerCase() : '';
    for (const el of document.querySelectorAll('[data-search]')) el.hidden = text !== '' && !el.dataset.search.includes(text);
  };
  const refresh = async () => {
    try {
      const res = await fetch(location.pathname, { headers: { accept: 'text/html' }, cache: 'no-store' });
      if (!res.ok) throw new Error('HTTP ' + res.status);
      const doc = new DOMParser().parseFromString(await res.text(), 'text/html');
      const old = document.getElementById('filter');
      const value = old ? old.value : '';
      const focused = document.activeElement === old;
      doc.body.dataset.loaded = String(Date.now());
      document.body.replaceWith(document.adoptNode(doc.body));
      document.title = doc.title;
      for (const d of document.querySelectorAll('details[data-key]')) if (toggled.has(d.dataset.key)) d.open = toggled.get(d.dataset.key);
      const input = document.getElementById('filter');
      if (input) { input.value = value; if (focused) input.focus(); }
      filter();
      lastOk = Date.now();
      failing = '';
    } catch (err) {
      failing = err instanceof Error ? err.message : String(err);
    }
    tick();
  };
  document.addEventListener('toggle', (e) => { if (e.target.dataset && e.target.dataset.key !== undefined) toggled.set(e.target.dataset.key, e.target.open); }, true);
  document.addEventListener('input', (e) => { if (e.target.id === 'filter') filter(); });
  document.body.dataset.loaded = String(Date.now());
  tick();
  setInterval(tick, 1000);
  const loop = () => setTimeout(() => refresh().then(loop), every());
  loop();
})();`;

const style = `
:root { color-scheme: light; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --mute: #59636e; --line: #d1d9e0; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; padding: 16px 24px 32px; color: #1f2328; background: #fff; }
body.stale { background: #fff8e6; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 20px 0 8px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff; font-weight: 600; }
.v-ok { background: var(--ok); } .v-degraded { background: var(--warn); } .v-failing { background: var(--bad); }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 10px 0; }
.facts dt { color: var(--mute); } .facts dd { margin: 0; }
#live { color: var(--mute); }
body.stale #live { color: var(--bad); font-weight: 600; }
ul.problems { margin: 4px 0; padding-left: 20px; } ul.problems li { margin: 2px 0; }
.good { color: var(--ok); } .warn { color: var(--warn); } .bad { color: var(--bad); font-weight: 600; } .mute { color: var(--mute); }
.badge { display: inline-block; border: 1px solid currentColor; border-radius: 4px; padding: 0 5px; font-size: 12px; margin-left: 6px; }
#filter { font: inherit; padding: 3px 8px; width: 280px; margin: 0 0 8px; }
details.service { border: 1px solid var(--line); border-radius: 6px; margin: 6px 0; }
details.service > summary { cursor: pointer; padding: 6px 10px; display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: baseline; list-style: none; }
details.service > summary::before { content: "▸"; color: var(--mute); width: 10px; }
details.service[open] > summary::before { content: "▾"; }
details.service[open] > summary { border-bottom: 1px solid var(--line); background: #f6f8fa; }
.svc-body { padding: 6px 10px 10px; }
.fqdn { font-weight: 600; }
table { border-collapse: collapse; margin: 4px 0 8px; }
h3 { font-size: 13px; font-weight: 600; margin: 10px 0 2px; }
th, td { text-align: left; padding: 2px 12px 2px 0; vertical-align: top; }
th { color: var(--mute); font-weight: 500; border-bottom: 1px solid var(--line); }
td.n, th.n { text-align: right; }
meter { width: 120px; }
.counters { color: var(--mute); }
`;

const sha256 = (text: string): string => `'sha256-${createHash('sha256').update(text, 'utf8').digest('base64')}'`;

/**
 * The page's Content-Security-Policy: nothing external, no inline script or style but the page's own
 * (by hash), fetches only to this origin (the refresh), no framing, no forms, no base URL.
 */
export const statusPageCsp = [
  "default-src 'none'",
  `script-src ${sha256(script)}`,
  `style-src ${sha256(style)}`,
  "connect-src 'self'",
  "img-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

/** The headers the page goes out with, besides its content type. */
export const statusPageHeaders: Readonly<Record<string, string>> = {
  'content-security-policy': statusPageCsp,
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  'referrer-policy': 'no-referrer',
};

const e = escapeHtml;

/** ISO 8601, or "?" for a time that is not one (never throws, unlike toISOString). */
function iso(at: number): string {
  return Number.isFinite(at) && Math.abs(at) <= 8.64e15 ? new Date(at).toISOString() : '?';
}

/** A time in the past as "N s ago", kept current by the page's script. */
function ago(at: number, now: number): string {
  if (iso(at) === '?') return '?';
  return `<time datetime="${e(iso(at))}" data-at="${e(at)}">${e(formatDuration(now - at))} ago</time>`;
}

/** A time in the future as "in N s". */
function until(at: number, now: number): string {
  if (iso(at) === '?') return '?';
  return `<time datetime="${e(iso(at))}" data-at="${e(at)}" data-dir="until">${at > now ? `in ${e(formatDuration(at - now))}` : 'now'}</time>`;
}

function clock(at: number): string {
  return iso(at).slice(11, 19);
}

interface BackendState {
  /** Short state: up, ejected, draining, ... */
  state: string;
  cls: 'good' | 'warn' | 'bad' | 'mute';
  /** Why, as HTML (already escaped). */
  why: string;
}

function backendState(b: BackendReport, route: RouteReport, now: number): BackendState {
  const ejectedUntil = b.ejectedUntil === undefined ? NaN : Date.parse(b.ejectedUntil);
  if (Number.isFinite(ejectedUntil) && ejectedUntil > now) {
    const reason = `${b.ejectReason ? `${e(b.ejectReason)} failures` : 'failures'} (${e(b.failedConnects)} failed connect${b.failedConnects === 1 ? '' : 's'}, ${e(b.resetsBeforeFirstByte)} reset${b.resetsBeforeFirstByte === 1 ? '' : 's'}); tried again ${until(ejectedUntil, now)} at ${e(clock(ejectedUntil))}`;
    if (route.panic) return { state: 'ejected, used anyway', cls: 'warn', why: `panic: too few usable backends, ejections ignored; ${reason}` };
    return { state: 'ejected', cls: 'bad', why: reason };
  }
  if (b.weight === 0) return { state: 'draining', cls: 'warn', why: 'weight 0 in Consul: no new connections, open ones go on' };
  if (b.ejectionsTotal > 0) return { state: 'up', cls: 'good', why: `back after ${e(b.ejectionsTotal)} ejection${b.ejectionsTotal === 1 ? '' : 's'}` };
  return { state: 'up', cls: 'good', why: '' };
}

function backendTable(backends: readonly BackendReport[], route: RouteReport, now: number, what: string): string {
  if (backends.length === 0) return `<p class="bad">no ${e(what)}s</p>`;
  const subsets = backends.some((b) => b.subset !== '');
  const rows = backends.map((b) => {
    const s = backendState(b, route, now);
    return `<tr class="backend" data-state="${e(s.state)}"><td class="mono">${e(b.id)}</td><td class="mono">${e(b.address)}:${e(b.port)}</td><td class="${s.cls}">${e(s.state)}</td><td>${s.why}</td><td class="n">${e(b.weight)}</td>${subsets ? `<td>${b.subset === '' ? '<span class="mute">(rest)</span>' : e(b.subset)}</td>` : ''}<td class="n">${e(b.activeConnections)} / ${e(b.totalConnections)}</td><td class="n">${e(b.failedConnects)}</td></tr>`;
  });
  return `<table class="${e(what)}s"><thead><tr><th>${e(what)}</th><th>address</th><th>state</th><th>why</th><th class="n">weight</th>${subsets ? '<th>subset</th>' : ''}<th class="n">open / total</th><th class="n">failed connects</th></tr></thead><tbody>${rows.join('')}</tbody></table>`;
}

function splitTable(route: RouteReport): string {
  const split = route.split ?? [];
  if (split.length === 0) return '';
  const total = split.reduce((sum, p) => sum + p.connections, 0);
  const rows = split.map((p) => {
    const got = total > 0 ? (p.connections * 100) / total : 0;
    return `<tr class="subset"><td>${p.name === '' ? '<span class="mute">(rest)</span>' : e(p.name)}</td><td class="n">${e(p.weight)} %</td><td><meter min="0" max="100" value="${e(p.weight)}" title="configured ${e(p.weight)} %"></meter></td><td class="n">${e(p.connections)}</td><td class="n">${total > 0 ? `${e(got.toFixed(1))} %` : '<span class="mute">-</span>'}</td></tr>`;
  });
  return `<h3 class="mute">split</h3><table class="split"><thead><tr><th>subset</th><th class="n">share</th><th></th><th class="n">connections</th><th class="n">got</th></tr></thead><tbody>${rows.join('')}</tbody></table>`;
}

/** Whether a service needs a look: the page opens those. */
function routeTrouble(route: RouteReport, now: number, problemServices: ReadonlySet<string>): string[] {
  const out: string[] = [];
  if (route.listening === false) out.push('NOT listening');
  if (route.backends.length === 0) out.push('no backends');
  const ejected = route.backends.filter((b) => b.ejectedUntil !== undefined && Date.parse(b.ejectedUntil) > now).length;
  if (ejected > 0) out.push(`${ejected} ejected`);
  if (route.panic) out.push('panic');
  if (route.unreachable) out.push('unreachable: via gateways');
  if (problemServices.has(route.service)) out.push('problem');
  return out;
}

function listeningText(route: RouteReport): string {
  if (route.listening === null) return '<span class="mute">served by a separate loopmesh balancer</span>';
  return route.listening ? '<span class="good">listening</span>' : '<span class="bad">NOT listening</span>';
}

function routeSection(route: RouteReport, index: number, now: number, problemServices: ReadonlySet<string>, problemsHtml: string, openAll: boolean): string {
  const trouble = routeTrouble(route, now, problemServices);
  const usable = route.backends.filter((b) => b.weight > 0 && !(b.ejectedUntil !== undefined && Date.parse(b.ejectedUntil) > now)).length;
  const search = `${route.service} ${route.name} ${route.fqdn} ${route.address}:${route.port}`.toLowerCase();
  const gatewaysShown = route.gateways.length > 0 || route.unreachable || route.gatewayConnections > 0;
  const counters = [
    `failed connections ${e(route.failedConnections)}`,
    `retries ${e(route.retries)}`,
    `queued ${e(route.queuedConnections)}`,
    `refused ${e(route.refusedConnections)}`,
    ...(gatewaysShown ? [`through a gateway ${e(route.gatewayConnections)}`] : []),
    // Absent from an agent of an older version.
    ...(route.bytesIn !== undefined && route.bytesOut !== undefined ? [`bytes in ${e(formatBytes(route.bytesIn))} / out ${e(formatBytes(route.bytesOut))}`] : []),
    ...(route.connectLatency && route.connectLatency.count > 0 ? [`backend connect mean ${e(meanMs(route.connectLatency.sumSeconds, route.connectLatency.count))} over ${e(route.connectLatency.count)}`] : []),
  ];
  const gateways = gatewaysShown
    ? `<h3 class="mute">gateways (proxy cluster)${route.unreachable ? ' <span class="badge bad">every backend unreachable: new connections go through a gateway</span>' : ''}</h3>${backendTable(route.gateways, route, now, 'gateway')}`
    : '';
  return `<details class="service" id="svc-${index}" data-key="${e(route.service)}" data-search="${e(search)}" data-trouble="${trouble.length > 0}"${openAll || trouble.length > 0 ? ' open' : ''}>
<summary><span class="fqdn">${e(route.fqdn)}</span><span class="mono">${e(route.address)}:${e(route.port)}</span><span>${route.service === route.name ? '' : `service ${e(route.service)} · `}policy ${e(route.policy ?? '?')}</span>${listeningText(route)}<span class="${usable === route.backends.length && usable > 0 ? 'good' : usable === 0 ? 'bad' : 'warn'}">${e(usable)}/${e(route.backends.length)} backends usable</span><span>${e(route.activeConnections)} open / ${e(route.totalConnections)} total</span>${trouble.map((t) => `<span class="badge ${t === 'problem' ? 'warn' : 'bad'}">${e(t)}</span>`).join('')}</summary>
<div class="svc-body">${problemsHtml}${backendTable(route.backends, route, now, 'backend')}${splitTable(route)}${gateways}<p class="counters">${counters.join(' · ')}</p></div>
</details>`;
}

function consulFacts(report: StatusReport, now: number): string {
  const c = report.consul;
  if (!c) return '<dt>Consul</dt><dd class="mute">none: a loopmesh balancer process serves the rendered files and never talks to Consul</dd>';
  const contact = c.lastContactAt === undefined ? '<span class="bad">never answered</span>' : `last contact ${ago(c.lastContactAt, now)}`;
  const state = c.connected ? '<span class="good">connected</span>' : '<span class="bad">UNREACHABLE</span> <span class="warn">(serving last-known-good)</span>';
  const lastError = c.lastError ? `<br><span class="${c.connected ? 'mute' : 'bad'}">last error <code>${e(c.lastError.code)}</code>: ${e(c.lastError.message)} (${ago(c.lastError.at, now)})</span>` : '';
  const errors = Object.entries(c.errors);
  const errorCounts = errors.length > 0 ? `<br><span class="mute">failed calls since start: ${errors.map(([code, n]) => `<code>${e(code)}</code> ${e(n)}`).join(', ')}</span>` : '';
  return `<dt>Consul</dt><dd id="consul">${state} · ${contact}${lastError}${errorCounts}</dd>`;
}

function problemItem(p: { service?: string; code: string; message: string }, anchors: ReadonlyMap<string, number>): string {
  const index = p.service === undefined ? undefined : anchors.get(p.service);
  const where = p.service === undefined ? '' : index === undefined ? `<span class="mono">${e(p.service)}</span>: ` : `<a href="#svc-${e(index)}" class="mono">${e(p.service)}</a>: `;
  return `<li><code>${e(p.code)}</code> ${where}${e(p.message)}</li>`;
}

/** The whole page for one report; `now` (epoch ms) is when it is rendered, for the ages it shows. */
export function statusPage(report: StatusReport, now: number): string {
  const anchors = new Map(report.routes.map((r, i) => [r.service, i]));
  const problemServices = new Set(report.problems.flatMap((p) => (p.service === undefined ? [] : [p.service])));
  const health = report.health;
  const every = refreshEvery(report.routes.length);
  // The verdict's reasons, but those already listed under Problems only by reference.
  const listed = new Set(report.problems.map((p) => `${p.code}\n${p.message}`));
  const ownReasons = health.reasons.filter((p) => !listed.has(`${p.code}\n${p.message}`));
  const reasons = health.reasons.length === 0 ? ''
    : `<ul class="problems reasons">${ownReasons.map((p) => problemItem(p, anchors)).join('')}${ownReasons.length < health.reasons.length ? `<li><a href="#problems">${ownReasons.length > 0 ? 'and ' : ''}${health.reasons.length - ownReasons.length === 1 ? 'the problem' : `the ${e(health.reasons.length - ownReasons.length)} problems`} listed below</a></li>` : ''}</ul>`;
  const listening = report.routes.filter((r) => r.listening === true).length;
  const ejected = report.routes.reduce((n, r) => n + r.backends.filter((b) => b.ejectedUntil !== undefined && Date.parse(b.ejectedUntil) > now).length, 0);
  const backends = report.routes.reduce((n, r) => n + r.backends.length, 0);
  const render = report.lastRenderAt === undefined ? '<span class="warn">none yet</span>' : `${ago(report.lastRenderAt, now)} <span class="mute">(${e(iso(report.lastRenderAt))})</span>`;
  const dns = report.dns
    ? `<dt>DNS</dt><dd>${Object.entries(report.dns).map(([k, v]) => `${e(k)} ${e(v)}`).join(' · ')}</dd>`
    : '';
  const problems = report.problems.length > 0
    ? `<ul class="problems" id="problem-list">${report.problems.map((p) => problemItem(p, anchors)).join('')}</ul>`
    : '<p class="good">none</p>';
  const routes = report.routes.map((r, i) => {
    const own = report.problems.filter((p) => p.service === r.service);
    const html = own.length > 0 ? `<ul class="problems">${own.map((p) => `<li class="warn"><code>${e(p.code)}</code> ${e(p.message)}</li>`).join('')}</ul>` : '';
    return routeSection(r, i, now, problemServices, html, report.routes.length <= openAllUpTo);
  });
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>loopmesh · ${e(report.node)} · ${e(health.status)}</title>
<noscript><meta http-equiv="refresh" content="${e(every)}"></noscript>
<style>${style}</style>
</head>
<body data-now="${e(now)}" data-every="${e(every)}">
<header>
<h1>loopmesh on <span class="mono" id="node">${e(report.node)}</span> <span class="verdict v-${e(health.status)}" id="health">${e(health.status)}</span></h1>
${reasons}
<dl class="facts">
${consulFacts(report, now)}
<dt>Data plane</dt><dd>${report.dataPlane === 'in-process' ? 'in this process' : 'a separate <code>loopmesh balancer</code> (this process renders)'}</dd>
<dt>Last render</dt><dd>${render}</dd>
<dt>Services</dt><dd>${e(report.routes.length)} (${report.dataPlane === 'in-process' ? `${e(listening)} listening, ` : ''}${e(backends)} backends, <span class="${ejected > 0 ? 'bad' : ''}">${e(ejected)} ejected</span>)</dd>
${dns}
<dt>This page</dt><dd>rendered ${e(iso(now))} · <span id="live">refreshes every ${e(every)} s</span> · the same as plain text for <code>curl</code> at <code>/</code>, as JSON at <code>/v1/routes</code></dd>
</dl>
</header>
<h2 id="problems">Problems (${e(report.problems.length)})</h2>
${problems}
<h2>Services (${e(report.routes.length)})</h2>
<input id="filter" type="search" placeholder="filter: name, address" aria-label="filter services" autocomplete="off">
${routes.join('\n')}
<script>${script}</script>
</body></html>
`;
}
