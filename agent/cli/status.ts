import type { HealthReport, RouteReport, StatusReport } from '../admin/report.js';
import { errorMessage } from '../errors.js';
import { expectArray, expectRecord, isRecord, parseHostPort } from '../validate.js';
import { parseFlags, UsageError } from './args.js';
import { usage } from './usage.js';

export function formatTable(rows: string[][]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ')).join('\n');
}

/** Control characters from anywhere (a service name, a message) never reach the terminal raw. */
function printable(value: unknown): string {
  return String(value).replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/**
 * The admin's answer is input like any other: checked for the fields the table needs, so an agent of
 * another version (one without `health`, say) gives a clear line rather than a TypeError.
 */
export function parseStatusReport(json: unknown): StatusReport {
  const raw = expectRecord(json, '/v1/routes');
  // null from a `loopmesh balancer` process, which never talks to Consul.
  const consul = raw.consul === null ? null : expectRecord(raw.consul, '/v1/routes consul');
  const routes = expectArray(raw.routes, '/v1/routes routes').map((r, i) => expectRecord(r, `/v1/routes routes[${i}]`) as unknown as RouteReport);
  const problems = Array.isArray(raw.problems) ? raw.problems.filter(isRecord).map((p) => ({ code: printable(p.code), message: printable(p.message) })) : [];
  const health: HealthReport | undefined = isRecord(raw.health) && typeof raw.health.status === 'string'
    ? { status: raw.health.status as HealthReport['status'], reasons: Array.isArray(raw.health.reasons) ? raw.health.reasons.filter(isRecord).map((r) => ({ code: printable(r.code), message: printable(r.message) })) : [] }
    : undefined;
  return { ...(raw as unknown as StatusReport), consul: consul as unknown as StatusReport['consul'], routes, problems, health: health ?? { status: 'unknown' as HealthReport['status'], reasons: [] } };
}

/** One subset of a split as the admin reported it; anything else in the array is left out. */
interface SplitRow {
  name: string;
  weight: number;
  connections: number;
}

function splitRows(value: unknown): SplitRow[] {
  if (!Array.isArray(value)) return [];
  return value.filter(isRecord).flatMap((p) =>
    typeof p.name === 'string' && typeof p.weight === 'number' && Number.isFinite(p.weight) && typeof p.connections === 'number' && Number.isFinite(p.connections) && p.connections >= 0
      ? [{ name: p.name, weight: p.weight, connections: p.connections }]
      : [],
  );
}

/**
 * Services with a traffic split: each subset, its weight, and the share of the connections the
 * subsets got (connections / all the subsets' connections). "-" when there were none yet, or when a
 * separate balancer process counts them (ask its admin).
 */
export function splitTable(report: StatusReport): string | undefined {
  const rows = [['SERVICE', 'SUBSET', 'WEIGHT', 'CONNECTIONS', 'SHARE']];
  for (const r of report.routes) {
    const parts = splitRows((r as { split?: unknown }).split);
    const total = parts.reduce((sum, p) => sum + p.connections, 0);
    const counted = r.listening !== null;
    for (const p of parts) {
      rows.push([
        printable(r.service),
        p.name === '' ? '(rest)' : printable(p.name),
        `${p.weight}%`,
        counted ? String(p.connections) : '-',
        counted && total > 0 ? `${((100 * p.connections) / total).toFixed(1)}%` : '-',
      ]);
    }
  }
  return rows.length > 1 ? formatTable(rows) : undefined;
}

/**
 * Backends that passive health has ejected now, with the reason and until when, and the routes in
 * panic (too few usable backends: ejections ignored). Undefined when there is nothing to say.
 */
export function ejectionTable(report: StatusReport): string | undefined {
  const rows = [['SERVICE', 'EJECTED BACKEND', 'REASON', 'UNTIL', 'EJECTIONS']];
  const panics: string[] = [];
  for (const r of report.routes) {
    if (r.panic === true) panics.push(`panic ${printable(r.service)}: too few usable backends, ejections ignored (all are used)`);
    for (const b of Array.isArray(r.backends) ? r.backends : []) {
      if (!isRecord(b) || typeof b.ejectedUntil !== 'string') continue;
      rows.push([printable(r.service), printable(`${String(b.id)} ${String(b.address)}:${String(b.port)}`), printable(b.ejectReason ?? '-'), printable(b.ejectedUntil), printable(b.ejectionsTotal ?? '-')]);
    }
  }
  const lines = [...(rows.length > 1 ? [formatTable(rows)] : []), ...panics];
  return lines.length > 0 ? lines.join('\n') : undefined;
}

/** Each route's gateways (the proxy cluster) and how many connections went through them. Undefined without any. */
export function gatewayTable(report: StatusReport): string | undefined {
  const rows = [['SERVICE', 'GATEWAY', 'ADDRESS:PORT', 'CONNECTIONS', 'STATE']];
  const notes: string[] = [];
  for (const r of report.routes) {
    if (r.unreachable === true) notes.push(`unreachable ${printable(r.service)}: every backend is down from this node; new connections go through a gateway first`);
    for (const g of Array.isArray(r.gateways) ? r.gateways : []) {
      if (!isRecord(g)) continue;
      rows.push([printable(r.service), printable(g.id), printable(`${String(g.address)}:${String(g.port)}`), printable(g.totalConnections ?? 0), typeof g.ejectedUntil === 'string' ? `ejected until ${printable(g.ejectedUntil)}` : 'ok']);
    }
  }
  const lines = [...(rows.length > 1 ? [formatTable(rows)] : []), ...notes];
  return lines.length > 0 ? lines.join('\n') : undefined;
}

export function statusTable(report: StatusReport): string {
  const rows = [['SERVICE', 'NAME', 'ADDRESS:PORT', 'POLICY', 'BACKENDS', 'LISTENING']];
  for (const r of report.routes) rows.push([printable(r.service), printable(r.fqdn), printable(`${r.address}:${r.port}`), typeof r.policy === 'string' ? printable(r.policy) : '-', printable(r.healthyBackends), r.listening === null ? '(balancer process)' : r.listening ? 'yes' : 'NO']);
  const split = splitTable(report);
  const consul = !report.consul ? 'none (balancer process, serving the rendered files)' : report.consul.connected ? 'connected' : `UNREACHABLE (serving last-known-good routes; ${printable(report.consul.lastError?.message ?? 'no answer yet')})`;
  const problems = report.problems.map((p) => `problem ${p.code}: ${p.message}`);
  const verdict = printable(report.health.status);
  const health = verdict === 'ok' ? 'health ok' : verdict === 'unknown' ? 'health unknown (this agent does not report it)' : `health ${verdict.toUpperCase()}: ${report.health.reasons.map((r) => r.code).join(', ')}`;
  const ejected = ejectionTable(report);
  const gateways = gatewayTable(report);
  return [`node ${printable(report.node)}, consul ${consul}`, health, '', formatTable(rows), ...(split ? ['', split] : []), ...(ejected ? ['', ejected] : []), ...(gateways ? ['', gateways] : []), ...(problems.length ? ['', ...problems] : [])].join('\n');
}

export async function printStatus(argv: string[]): Promise<number> {
  const flags = parseFlags(argv, { json: { type: 'boolean' } }, ['admin']);
  if (flags.help) {
    process.stdout.write(usage.status);
    return 0;
  }
  const admin = typeof flags.admin === 'string' ? flags.admin : process.env.LOOPMESH_ADMIN ?? '127.0.0.1:9190';
  let endpoint: { host: string; port: number };
  try {
    endpoint = parseHostPort(admin, '--admin');
  } catch (err) {
    throw new UsageError(errorMessage(err));
  }
  const url = `http://${endpoint.host.includes(':') ? `[${endpoint.host}]` : endpoint.host}:${endpoint.port}/v1/routes`;
  let report: StatusReport;
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(5000) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    report = parseStatusReport(await res.json());
  } catch (err) {
    process.stderr.write(`loopmesh: cannot read ${url} (${errorMessage(err)}); is the agent running with --admin ${admin}?\n`);
    return 1;
  }
  process.stdout.write(flags.json ? `${JSON.stringify(report, null, 2)}\n` : `${statusTable(report)}\n`);
  return 0;
}
