import type { StatusReport } from '../admin/report.js';
import { errorMessage } from '../errors.js';
import { parseHostPort } from '../validate.js';
import { parseFlags, UsageError } from './args.js';
import { usage } from './usage.js';

export function formatTable(rows: string[][]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ')).join('\n');
}

export function statusTable(report: StatusReport): string {
  const rows = [['SERVICE', 'NAME', 'ADDRESS:PORT', 'BACKENDS', 'LISTENING']];
  for (const r of report.routes) rows.push([r.service, r.fqdn, `${r.address}:${r.port}`, String(r.healthyBackends), r.listening === null ? '(balancer process)' : r.listening ? 'yes' : 'NO']);
  const consul = report.consul.connected ? 'connected' : `UNREACHABLE (serving last-known-good routes; ${report.consul.lastError?.message ?? 'no answer yet'})`;
  const problems = report.problems.map((p) => `problem ${p.code}: ${p.message}`);
  const health = report.health.status === 'ok' ? 'health ok' : `health ${report.health.status.toUpperCase()}: ${report.health.reasons.map((r) => r.code).join(', ')}`;
  return [`node ${report.node}, consul ${consul}`, health, '', formatTable(rows), ...(problems.length ? ['', ...problems] : [])].join('\n');
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
    report = (await res.json()) as StatusReport;
  } catch (err) {
    process.stderr.write(`loopmesh: cannot read ${url} (${errorMessage(err)}); is the agent running with --admin ${admin}?\n`);
    return 1;
  }
  process.stdout.write(flags.json ? `${JSON.stringify(report, null, 2)}\n` : `${statusTable(report)}\n`);
  return 0;
}
