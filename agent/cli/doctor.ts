import { lookup } from 'node:dns/promises';
import { readFile, stat } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { connect } from 'node:net';
import { join } from 'node:path';
import { execa } from 'execa';
import type { StatusReport } from '../admin/report.js';
import type { AgentConfig } from '../config/config.js';
import { ConsulClient, consulClientOptions } from '../consul/client.js';
import { parseBalancerConfig } from '../contract/balancer-config.js';
import { balancerFile } from '../contract/files.js';
import { codes, errorCode, errorMessage } from '../errors.js';
import { checkRunDir, readRunDirFile } from '../fs/run-dir.js';
import { silentLogger } from '../log.js';
import { isRecord } from '../validate.js';
import { loadConfig, parseFlags, tokenInArgv } from './args.js';
import { parseStatusReport } from './status.js';
import { usage } from './usage.js';

/**
 * `loopmesh doctor`: looks at this node the way a client and the agent do, and says what is wrong
 * and how to fix it. Facts are gathered first (the I/O below `collect`), then judged by pure check
 * functions over them, so every verdict is unit-tested without a machine set up wrong.
 */

export type Verdict = 'ok' | 'warn' | 'FAIL';

export interface CheckResult {
  verdict: Verdict;
  check: string;
  seen: string;
  /** How to fix it; printed for FAIL and warn. */
  fix?: string;
}

/** A route as doctor needs it: from the admin's /v1/routes, or from balancer.json when the admin is off or down. */
export interface DoctorRoute {
  service: string;
  fqdn: string;
  address: string;
  port: number;
  /** null: a separate `loopmesh balancer` serves (or unknown, from balancer.json). */
  listening: boolean | null;
  gateways: Array<{ id: string; address: string; port: number }>;
}

/** Control characters from anywhere never reach the terminal raw. */
function printable(value: unknown): string {
  return String(value).replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

function clip(text: string, max = 160): string {
  return text.length > max ? `${text.slice(0, max - 3)}...` : text;
}

// ---------------------------------------------------------------------------------------------
// The admin's report

export type AdminFacts =
  | { state: 'off' }
  | { state: 'unreachable'; url: string; error: string }
  | { state: 'invalid'; url: string; error: string }
  | { state: 'answered'; url: string; report: StatusReport };

/** The routes of a report, each field checked; a wrong-shaped route is one line, not a crash. */
export function reportRoutes(report: StatusReport): { routes: DoctorRoute[]; bad: string[] } {
  const routes: DoctorRoute[] = [];
  const bad: string[] = [];
  report.routes.forEach((raw, i) => {
    const r = raw as unknown as Record<string, unknown>;
    if (typeof r.service !== 'string' || typeof r.fqdn !== 'string' || typeof r.address !== 'string' || typeof r.port !== 'number' || !Number.isInteger(r.port)) {
      bad.push(`routes[${i}]: expected service, fqdn, address (strings) and port (an integer), got ${printable(clip(JSON.stringify(r)))}`);
      return;
    }
    const gateways = (Array.isArray(r.gateways) ? r.gateways : []).flatMap((g) =>
      isRecord(g) && typeof g.address === 'string' && typeof g.port === 'number' ? [{ id: typeof g.id === 'string' ? g.id : `${g.address}:${g.port}`, address: g.address, port: g.port }] : [],
    );
    routes.push({ service: r.service, fqdn: r.fqdn.toLowerCase(), address: r.address, port: r.port, listening: typeof r.listening === 'boolean' ? r.listening : null, gateways });
  });
  return { routes, bad };
}

export function checkAdmin(admin: AdminFacts, fallback: { routes: number } | undefined): CheckResult[] {
  if (admin.state === 'off') {
    return [{ verdict: 'warn', check: 'admin', seen: `--admin is off: no live report; ${fallback ? `the ${fallback.routes} routes of balancer.json are checked instead` : 'no routes to check'}`, fix: 'give doctor the --admin ADDR:PORT the agent (or loopmesh balancer) serves on' }];
  }
  if (admin.state === 'unreachable') {
    return [
      {
        verdict: 'FAIL',
        check: 'admin',
        seen: `${admin.url} does not answer (${printable(admin.error)})${fallback ? `; the ${fallback.routes} routes of balancer.json are checked instead` : ''}`,
        fix: 'start the agent (loopmesh agent) or loopmesh balancer with --admin, or give doctor the --admin it serves on (default 127.0.0.1:9190)',
      },
    ];
  }
  if (admin.state === 'invalid') {
    return [
      {
        verdict: 'FAIL',
        check: 'admin',
        seen: `${admin.url} answers, but not with a loopmesh report (${printable(admin.error)})${fallback ? `; the ${fallback.routes} routes of balancer.json are checked instead` : ''}`,
        fix: "is --admin the port of this node's loopmesh? doctor and the agent may also be of different versions",
      },
    ];
  }
  const { report } = admin;
  const out: CheckResult[] = [];
  const { routes, bad } = reportRoutes(report);
  const plane = report.dataPlane === 'separate' ? 'a separate loopmesh balancer serves them' : 'served in process';
  out.push({ verdict: 'ok', check: 'admin', seen: `${admin.url} answers: node ${printable(report.node)}, ${routes.length} routes, ${plane}` });
  for (const b of bad) out.push({ verdict: 'FAIL', check: 'admin report', seen: printable(b), fix: 'doctor and the agent may be of different versions: run the same loopmesh for both' });
  const down = routes.filter((r) => r.listening === false);
  if (down.length > 0) {
    out.push({ verdict: 'FAIL', check: 'listening', seen: `${down.length} of ${routes.length} routes not listening: ${down.map((r) => `${printable(r.service)} ${r.address}:${r.port}`).join(', ')}`, fix: 'see the port checks below and the agent log (LM_ERR_BALANCER_LISTEN)' });
  } else if (routes.some((r) => r.listening === true)) {
    out.push({ verdict: 'ok', check: 'listening', seen: `all ${routes.length} routes listen` });
  }
  const health = report.health;
  if (health.status === 'ok') out.push({ verdict: 'ok', check: 'health', seen: 'ok' });
  else if ((health.status as string) === 'unknown') out.push({ verdict: 'warn', check: 'health', seen: 'this agent does not report a health verdict (an older version?)' });
  else {
    const reasons = health.reasons.map((r) => `${r.code}: ${printable(clip(r.message, 200))}`).join('; ');
    out.push({ verdict: 'FAIL', check: 'health', seen: `${printable(health.status)}: ${reasons || 'no reason given'}`, fix: 'each reason names its cause; the agent log has the details' });
  }
  if (report.consul && report.consul.connected === false) {
    out.push({ verdict: 'FAIL', check: 'agent consul', seen: `the agent has lost Consul: ${printable(report.consul.lastError?.message ?? 'no answer yet')}; it serves its last-known-good routes`, fix: 'see the consul checks below' });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// /etc/nsswitch.conf

export interface NssSource {
  name: string;
  /** STATUS (upper case, "!" kept) -> action (lower case), from the [...] after the source. */
  actions: Record<string, string>;
}

export interface NssHosts {
  /** The hosts: line as read; undefined when there is none (glibc's default then applies). */
  line: string | undefined;
  sources: NssSource[];
  /** Anything in the line that is not a source or a [STATUS=action] list. */
  junk: string[];
}

/** glibc's default when nsswitch.conf has no hosts: line. */
const defaultHosts = 'dns [!UNAVAIL=return] files';

/** The hosts: line of nsswitch.conf (the first; comments dropped), parsed into sources and actions. */
export function parseNsswitchHosts(text: string | undefined): NssHosts {
  const line = (text ?? '')
    .split('\n')
    .map((l) => l.replace(/#.*/, '').trim())
    .find((l) => /^hosts\s*:/.test(l));
  const body = (line ?? `hosts: ${defaultHosts}`).replace(/^hosts\s*:/, '');
  const sources: NssSource[] = [];
  const junk: string[] = [];
  for (const token of body.match(/\[[^\]]*\]?|[^\s[]+/g) ?? []) {
    if (token.startsWith('[')) {
      const last = sources[sources.length - 1];
      const pairs = token.endsWith(']') ? token.slice(1, -1).trim().split(/\s+/).filter(Boolean) : undefined;
      if (!last || !pairs || !pairs.every((p) => /^!?[A-Za-z]+=[A-Za-z]+$/.test(p))) {
        junk.push(token);
        continue;
      }
      for (const p of pairs) {
        const [status = '', action = ''] = p.split('=');
        last.actions[status.toUpperCase()] = action.toLowerCase();
      }
    } else if (/^[A-Za-z0-9_-]+$/.test(token)) sources.push({ name: token, actions: {} });
    else junk.push(token);
  }
  return { line: line?.replace(/\s+/g, ' '), sources, junk };
}

const isMdns = (name: string): boolean => /^mdns[46]?(_minimal)?$/.test(name);

/** Whether a source before files can end the lookup on a miss, so that files is never asked. */
function stopsOnMiss(s: NssSource): boolean {
  return s.actions.NOTFOUND === 'return' || s.actions['!UNAVAIL'] === 'return' || s.actions['!SUCCESS'] === 'return';
}

export interface ResolverFacts {
  nsswitchPath: string;
  /** undefined: the file could not be read (the error is in nsswitchError). */
  nsswitch: string | undefined;
  nsswitchError?: string;
  /** avahi-daemon's socket exists: mdns* modules get answers (NOTFOUND for names nobody announces). */
  avahiRunning: boolean;
  resolvConf: string | undefined;
  /** Whether any NAME.SUFFIX lookup failed or gave another address. */
  lookupsFailed: boolean;
  suffix: string;
}

/** What stands between getaddrinfo and the hosts file, for one node's nsswitch.conf. */
export interface NssFinding {
  /** A source before files that ends a lookup on a miss. */
  blocker: NssSource | undefined;
  filesMissing: boolean;
  /** mdns sources before files that do not stop the lookup but make each miss wait for mDNS. */
  slow: NssSource[];
}

export function nssFinding(hosts: NssHosts): NssFinding {
  const filesAt = hosts.sources.findIndex((s) => s.name === 'files');
  const before = filesAt < 0 ? hosts.sources : hosts.sources.slice(0, filesAt);
  return {
    blocker: before.find(stopsOnMiss),
    filesMissing: filesAt < 0,
    slow: before.filter((s) => isMdns(s.name) && !s.name.endsWith('_minimal') && !stopsOnMiss(s)),
  };
}

function describeSource(s: NssSource): string {
  const actions = Object.entries(s.actions).map(([k, v]) => `${k}=${v}`);
  return actions.length > 0 ? `${s.name} [${actions.join(' ')}]` : s.name;
}

export function nameservers(resolvConf: string | undefined): string[] {
  return (resolvConf ?? '').split('\n').flatMap((l) => /^\s*nameserver\s+(\S+)/.exec(l)?.[1] ?? []);
}

const fixedHostsLine = (hosts: NssHosts): string => {
  const rest = hosts.sources.filter((s) => s.name !== 'files').map(describeSource);
  return `hosts: files ${rest.join(' ')}`.trim();
};

export function checkNsswitch(facts: ResolverFacts): CheckResult {
  const check = 'nsswitch';
  if (facts.nsswitch === undefined && facts.nsswitchError !== undefined && !/ENOENT/.test(facts.nsswitchError)) {
    return { verdict: 'warn', check, seen: `cannot read ${facts.nsswitchPath} (${printable(facts.nsswitchError)})`, fix: `make ${facts.nsswitchPath} readable (mode 644)` };
  }
  const hosts = parseNsswitchHosts(facts.nsswitch);
  const f = nssFinding(hosts);
  const line = hosts.line ? `"${printable(hosts.line)}"` : `no hosts: line (glibc's default "${defaultHosts}")`;
  const fix = `in ${facts.nsswitchPath}: ${fixedHostsLine(hosts)} (files first, so the hosts file answers .${facts.suffix} before anything else)`;
  const junk = hosts.junk.length > 0 ? `; not understood: ${hosts.junk.map((j) => printable(clip(j, 40))).join(' ')}` : '';
  if (f.blocker) {
    const b = f.blocker;
    if (isMdns(b.name)) {
      const state = facts.avahiRunning ? 'avahi-daemon runs, so mDNS answers NOTFOUND for names nobody announces and the lookup stops before files' : 'avahi-daemon is not running now, so the module is unavailable and files is still asked; once avahi runs, it takes those names away';
      const verdict: Verdict = facts.avahiRunning || facts.lookupsFailed ? 'FAIL' : 'warn';
      return { verdict, check, seen: `${line}: multicast DNS (${describeSource(b)}) comes before files and owns .local: ${state}${junk}`, fix };
    }
    const verdict: Verdict = facts.lookupsFailed ? 'FAIL' : 'warn';
    const dns = b.name === 'dns' ? ` (nameservers ${nameservers(facts.resolvConf).join(', ') || 'none in resolv.conf'})` : b.name === 'resolve' ? ' (systemd-resolved, which sends .local to mDNS/LLMNR)' : '';
    return { verdict, check, seen: `${line}: ${describeSource(b)}${dns} comes before files and ends the lookup on a miss, so the hosts file may never be read${junk}`, fix };
  }
  if (f.filesMissing) {
    const servers = nameservers(facts.resolvConf);
    return {
      verdict: facts.lookupsFailed ? 'FAIL' : 'warn',
      check,
      seen: `${line}: no files source, so the hosts file (and its loopmesh block) is never read; lookups go to ${hosts.sources.map((s) => s.name).join(', ') || 'nothing'}${servers.length ? ` (nameservers ${servers.join(', ')})` : ''}${junk}`,
      fix,
    };
  }
  if (f.slow.length > 0) {
    return { verdict: 'warn', check, seen: `${line}: ${f.slow.map((s) => s.name).join(', ')} before files asks multicast DNS first for every name: slow lookups${junk}`, fix };
  }
  if (junk) return { verdict: 'warn', check, seen: `${line}${junk}`, fix: `correct the hosts: line of ${facts.nsswitchPath}` };
  return { verdict: 'ok', check, seen: `${line}: files comes first` };
}

// ---------------------------------------------------------------------------------------------
// The hosts file

export interface HostsFacts {
  /** The hosts file the agent writes (--hosts-file); undefined: off. */
  path: string | undefined;
  text: string | undefined;
  error?: string;
  /** The file the system resolver reads. */
  systemPath: string;
}

export interface HostsBlock {
  found: boolean;
  /** Lower-case name -> addresses, in block order. */
  names: Map<string, string[]>;
  /** Names mapped outside the block: name -> {line number, address}, first mapping only. */
  outside: Map<string, { line: number; address: string }>;
  /** Lines inside the block that are not comments or ADDRESS NAME... */
  junk: Array<{ line: number; text: string }>;
  unclosed: boolean;
}

/** The loopmesh block of a hosts file and what else the file says about the same names. */
export function parseHostsFile(text: string): HostsBlock {
  const names = new Map<string, string[]>();
  const outside = new Map<string, { line: number; address: string }>();
  const junk: HostsBlock['junk'] = [];
  let inside = false;
  let found = false;
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (/^# BEGIN loopmesh(\s|$)/.test(line)) {
      inside = true;
      found = true;
      return;
    }
    if (line.trimEnd() === '# END loopmesh') {
      inside = false;
      return;
    }
    const body = line.replace(/#.*/, '').trim();
    if (body === '') return;
    const [address = '', ...hostNames] = body.split(/[ \t]+/);
    const looksRight = /^[0-9a-fA-F.:]+$/.test(address) && hostNames.length > 0;
    if (!looksRight) {
      if (inside) junk.push({ line: i + 1, text: line });
      return;
    }
    for (const n of hostNames.map((h) => h.toLowerCase())) {
      if (inside) names.set(n, [...(names.get(n) ?? []), address]);
      else if (!outside.has(n)) outside.set(n, { line: i + 1, address });
    }
  });
  return { found, names, outside, junk, unclosed: inside };
}

export function checkHostsFile(facts: HostsFacts, routes: readonly DoctorRoute[]): CheckResult[] {
  const check = 'hosts file';
  if (facts.path === undefined) {
    return [{ verdict: 'warn', check, seen: `--hosts-file is off: names resolve only if DNS sends .local to loopmesh's responder`, fix: 'run the agent with --hosts-file /etc/hosts (the default), or point the system resolver at --dns' }];
  }
  const out: CheckResult[] = [];
  if (facts.path !== facts.systemPath) {
    out.push({ verdict: 'warn', check, seen: `the agent writes ${printable(facts.path)}, but the system resolver reads ${facts.systemPath}`, fix: `run the agent with --hosts-file ${facts.systemPath}` });
  }
  if (facts.text === undefined) {
    out.push({ verdict: 'FAIL', check, seen: `cannot read ${printable(facts.path)} (${printable(facts.error ?? 'unknown error')})`, fix: `check that ${printable(facts.path)} exists and is readable` });
    return out;
  }
  const block = parseHostsFile(facts.text);
  if (!block.found) {
    out.push({ verdict: routes.length > 0 ? 'FAIL' : 'warn', check, seen: `${printable(facts.path)} has no loopmesh block (# BEGIN loopmesh ... # END loopmesh)`, fix: `run the agent with --hosts-file ${printable(facts.path)}; if it runs, its log says why it cannot write there (LM_ERR_HOSTS_WRITE, LM_ERR_HOSTS_OWNED)` });
    return out;
  }
  if (block.unclosed) out.push({ verdict: 'warn', check, seen: `the loopmesh block in ${printable(facts.path)} has no "# END loopmesh" line`, fix: 'remove the stray "# BEGIN loopmesh" line; the agent writes a complete block on its next render' });
  for (const j of block.junk.slice(0, 5)) {
    out.push({ verdict: 'warn', check, seen: `${printable(facts.path)} line ${j.line} in the loopmesh block is not "ADDRESS NAME...": ${printable(clip(JSON.stringify(j.text), 80))}`, fix: 'remove it; the block is the agent\'s (it rewrites it on each render)' });
  }
  const missing = routes.filter((r) => !block.names.has(r.fqdn));
  const wrong = routes.filter((r) => block.names.has(r.fqdn) && block.names.get(r.fqdn)?.[0] !== r.address);
  for (const r of missing) out.push({ verdict: 'FAIL', check, seen: `the loopmesh block in ${printable(facts.path)} has no line for ${printable(r.fqdn)} (route ${r.address}:${r.port})`, fix: 'the agent rewrites the block on each change: see its log for LM_ERR_HOSTS_WRITE or a dropped line (LM_ERR_HOSTS_INVALID_LINE)' });
  for (const r of wrong) out.push({ verdict: 'FAIL', check, seen: `the loopmesh block in ${printable(facts.path)} gives ${printable(r.fqdn)} ${printable(block.names.get(r.fqdn)?.join(' ') ?? '')}; the route is ${r.address}`, fix: 'a stale block: is another agent writing this file, or is this agent stuck? see its log' });
  for (const r of routes) {
    const other = block.outside.get(r.fqdn);
    if (other && other.address !== r.address) {
      out.push({ verdict: 'warn', check, seen: `${printable(facts.path)} line ${other.line}, outside the loopmesh block, maps ${printable(r.fqdn)} to ${printable(other.address)}`, fix: `remove that line: the name is loopmesh's (${r.address})` });
    }
  }
  if (missing.length === 0 && wrong.length === 0) out.push({ verdict: 'ok', check, seen: `${printable(facts.path)}: the loopmesh block names all ${routes.length} routes` });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Name resolution through getaddrinfo

export type LookupResult = { addresses: string[] } | { error: string };

/** One line per route: NAME resolves (first) to the route's address, else what it gave and why. */
export function checkResolution(route: DoctorRoute, result: LookupResult, why: readonly CheckResult[]): CheckResult {
  const check = `resolve ${printable(route.fqdn)}`;
  const causes = why.filter((c) => c.verdict !== 'ok');
  const reason = causes.length > 0 ? `; likely cause: ${causes.map((c) => `${c.check}: ${c.seen}`).join(' / ')}` : '';
  const fix = causes.find((c) => c.fix)?.fix ?? 'see the nsswitch and hosts file lines';
  if ('error' in result) {
    return { verdict: 'FAIL', check, seen: `getaddrinfo finds nothing (${printable(result.error)})${reason}`, fix };
  }
  const first = result.addresses[0];
  if (first === route.address) {
    const more = result.addresses.length > 1 ? ` (then ${result.addresses.slice(1).join(', ')})` : '';
    return { verdict: 'ok', check, seen: `${route.address}${more}` };
  }
  const has = result.addresses.includes(route.address);
  return {
    verdict: 'FAIL',
    check,
    seen: `getaddrinfo gives ${result.addresses.map(printable).join(', ') || 'no address'}${has ? ` with the route's ${route.address} not first` : `, not the route's ${route.address}`}${reason}`,
    fix: causes.length > 0 ? fix : `another source answers ${printable(route.fqdn)} before the hosts file: put files first on the hosts: line of /etc/nsswitch.conf and remove other lines naming it from /etc/hosts`,
  };
}

// ---------------------------------------------------------------------------------------------
// TCP: the data plane, conflicts, gateways

export type ConnectResult = { ok: true; ms: number } | { ok: false; error: string };

export function checkDataPlane(route: DoctorRoute, result: ConnectResult): CheckResult {
  const check = `data plane ${printable(route.service)}`;
  if (result.ok && route.listening === false) {
    return { verdict: 'FAIL', check, seen: `${route.address}:${route.port} accepts a connection, but loopmesh does not listen there: another process answers ${printable(route.fqdn)}'s clients`, fix: 'see the port line for who holds it' };
  }
  if (result.ok) return { verdict: 'ok', check, seen: `${route.address}:${route.port} accepts a connection (${result.ms} ms)` };
  return { verdict: 'FAIL', check, seen: `${route.address}:${route.port} does not accept a connection (${printable(result.error)})`, fix: 'is the agent (or loopmesh balancer) running? see the listening and port lines' };
}

export interface Listener {
  /** "0.0.0.0", "::" or "*" for every address. */
  address: string;
  port: number;
  process?: string;
  pid?: number;
}

/** `ss -lntpH` output -> listeners. Lines that do not parse are skipped. */
export function parseSs(text: string): Listener[] {
  const out: Listener[] = [];
  for (const line of text.split('\n')) {
    const fields = line.trim().split(/\s+/);
    const local = fields[3];
    if (fields[0] !== 'LISTEN' || !local) continue;
    const m = /^(.*):(\d+)$/.exec(local);
    if (!m?.[1] || !m[2]) continue;
    const address = m[1].replace(/^\[(.*)\]$/, '$1').replace(/%.*$/, '');
    const users = /users:\(\("((?:[^"\\]|\\.)*)",pid=(\d+)/.exec(line);
    out.push({ address, port: Number(m[2]), ...(users?.[1] && users[2] ? { process: users[1], pid: Number(users[2]) } : {}) });
  }
  return out;
}

/** /proc/net/tcp (IPv4) -> listeners (state 0A), when ss is not there. */
export function parseProcNetTcp(text: string): Listener[] {
  const out: Listener[] = [];
  for (const line of text.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    const local = fields[1];
    if (fields[3] !== '0A' || !local) continue;
    const [hex = '', portHex = ''] = local.split(':');
    if (hex.length !== 8) continue;
    const bytes = [6, 4, 2, 0].map((i) => parseInt(hex.slice(i, i + 2), 16));
    out.push({ address: bytes.join('.'), port: parseInt(portHex, 16) });
  }
  return out;
}

const wildcard = (a: string): boolean => a === '0.0.0.0' || a === '::' || a === '*';

export function checkPort(route: DoctorRoute, listeners: readonly Listener[] | undefined, loopmeshPids: ReadonlySet<number>): CheckResult {
  const check = `port ${printable(route.service)}`;
  const where = `${route.address}:${route.port}`;
  if (!listeners) return { verdict: 'warn', check, seen: `cannot list the listening sockets (neither ss nor /proc/net/tcp); ${where} not checked` };
  const holders = listeners.filter((l) => l.port === route.port && (l.address === route.address || l.address === `::ffff:${route.address}` || wildcard(l.address)));
  const who = (l: Listener): string => (l.process ? `${printable(l.process)} (pid ${l.pid}) on ${l.address}:${l.port}` : `a process on ${l.address}:${l.port}`);
  const others = holders.filter((l) => l.pid === undefined ? route.listening === false : !loopmeshPids.has(l.pid));
  if (route.listening === false) {
    if (others.length > 0) {
      return { verdict: 'FAIL', check, seen: `${where} is not loopmesh's: ${others.map(who).join(', ')} holds it`, fix: `stop that process or move it off port ${route.port}, or give the service another port (Consul meta loopmesh-port); the agent binds again on its next change` };
    }
    return { verdict: 'FAIL', check, seen: `${where}: loopmesh does not listen and nothing else holds the port`, fix: 'see the health reasons (LM_ERR_BALANCER_LISTEN) and the agent log' };
  }
  if (holders.length === 0) {
    return route.listening === true
      ? { verdict: 'warn', check, seen: `the agent reports ${where} listening, but no listener is seen there (another network namespace?)` }
      : { verdict: 'FAIL', check, seen: `nothing listens on ${where}`, fix: `start 'loopmesh balancer --run-dir ...' (split mode), or the agent` };
  }
  const foreign = loopmeshPids.size > 0 ? holders.filter((l) => l.pid !== undefined && !loopmeshPids.has(l.pid) && wildcard(l.address)) : [];
  if (foreign.length > 0) return { verdict: 'warn', check, seen: `${where} listens, and ${foreign.map(who).join(', ')} also holds port ${route.port} on every address`, fix: 'bind that process to its own address only' };
  return { verdict: 'ok', check, seen: `${where} held by ${holders.map(who).join(', ')}` };
}

export function checkGateways(route: DoctorRoute, results: ReadonlyArray<{ gateway: DoctorRoute['gateways'][number]; result: ConnectResult }>): CheckResult | undefined {
  if (route.gateways.length === 0) return undefined;
  const check = `gateway ${printable(route.service)}`;
  const up = results.filter((r) => r.result.ok);
  const down = results.filter((r) => !r.result.ok).map((r) => `${printable(r.gateway.address)}:${r.gateway.port} (${r.result.ok ? '' : printable(r.result.error)})`);
  if (up.length === 0) return { verdict: 'warn', check, seen: `none of the ${route.gateways.length} gateways answers: ${down.join(', ')}; no fallback when every instance is down`, fix: 'check that the loopmesh gateway processes run and that this node reaches their --gateway-range (routes, firewall)' };
  return { verdict: 'ok', check, seen: `${up.length} of ${route.gateways.length} gateways answer${down.length ? `; down: ${down.join(', ')}` : ''}` };
}

// ---------------------------------------------------------------------------------------------
// Consul

export interface ConsulFacts {
  url: string;
  leader: { ok: true; leader: string } | { ok: false; error: string; code: string };
  /** GET /v1/acl/token/self; undefined when Consul did not answer at all. */
  token?: { status: number; body: string } | { error: string };
  /** POST /v1/internal/acl/authorize answers, per right asked; undefined when ACLs are off or it failed. */
  rights?: Array<{ what: string; allowed: boolean; needed: string }>;
  rightsError?: string;
  tokenGiven: boolean;
}

export function checkConsul(f: ConsulFacts): CheckResult[] {
  const out: CheckResult[] = [];
  if (!f.leader.ok) {
    const tls = f.leader.code === 'LM_ERR_CONSUL_TLS';
    out.push({
      verdict: 'FAIL',
      check: 'consul',
      seen: printable(f.leader.error),
      fix: tls ? 'set --ca-file, --client-cert/--client-key or --tls-server-name as the message says' : `start the local Consul agent, or give --consul the address it listens on (CONSUL_HTTP_ADDR); now ${f.url}`,
    });
    return out;
  }
  if (f.leader.leader === '') {
    out.push({ verdict: 'FAIL', check: 'consul', seen: `${f.url} answers but its cluster has no leader`, fix: 'the Consul servers have lost quorum: see `consul operator raft list-peers` and the servers\' logs' });
  } else out.push({ verdict: 'ok', check: 'consul', seen: `${f.url} answers, leader ${printable(f.leader.leader)}` });
  const t = f.token;
  if (!t) return out;
  if ('error' in t) {
    out.push({ verdict: 'warn', check: 'token', seen: `cannot ask ${f.url}/v1/acl/token/self (${printable(t.error)})` });
    return out;
  }
  if (t.status === 401 && /ACL support disabled/i.test(t.body)) {
    out.push({ verdict: 'ok', check: 'token', seen: `ACLs off${f.tokenGiven ? ' (the token given is not needed)' : ''}` });
    return out;
  }
  if (t.status === 403) {
    out.push({
      verdict: 'FAIL',
      check: 'token',
      seen: f.tokenGiven ? `Consul refuses the token: ${printable(clip(t.body.trim(), 120))}` : `ACLs are on and no token is given: ${printable(clip(t.body.trim(), 120))}`,
      fix: f.tokenGiven ? 'the token is unknown, expired or revoked: give a valid one with --token-file FILE or CONSUL_HTTP_TOKEN' : 'give a token with --token-file FILE or CONSUL_HTTP_TOKEN',
    });
    return out;
  }
  if (t.status !== 200) {
    out.push({ verdict: 'warn', check: 'token', seen: `acl/token/self answered HTTP ${t.status}: ${printable(clip(t.body.trim(), 120))}` });
    return out;
  }
  let description = '';
  try {
    const body = JSON.parse(t.body) as unknown;
    if (isRecord(body)) {
      const policies = Array.isArray(body.Policies) ? body.Policies.flatMap((p) => (isRecord(p) && typeof p.Name === 'string' ? [p.Name] : [])) : [];
      description = `${typeof body.Description === 'string' && body.Description ? `"${printable(clip(body.Description, 60))}", ` : ''}policies ${policies.map(printable).join(', ') || 'none'}`;
      if (typeof body.ExpirationTime === 'string') description += `, expires ${printable(body.ExpirationTime)}`;
    }
  } catch {
    description = 'an answer that is not JSON';
  }
  out.push({ verdict: 'ok', check: 'token', seen: `valid: ${description}` });
  if (f.rights) {
    const missing = f.rights.filter((r) => !r.allowed);
    if (missing.length === 0) out.push({ verdict: 'ok', check: 'acl rights', seen: f.rights.map((r) => r.what).join(', ') });
    else {
      out.push({
        verdict: 'FAIL',
        check: 'acl rights',
        seen: `the token lacks ${missing.map((r) => `${r.what} (${r.needed})`).join(', ')}`,
        fix: `add to the token's policy: ${missing.map((r) => r.what.replace(/^(\w+):(\w+) (.*)$/, '$1 "$3" { policy = "$2" }').replace(/^(\w+):(\w+)$/, '$1_prefix "" { policy = "$2" }')).join('; ')}`,
      });
    }
  } else if (f.rightsError) out.push({ verdict: 'warn', check: 'acl rights', seen: `cannot ask Consul which rights the token has (${printable(f.rightsError)})` });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The run dir

export interface RunDirFacts {
  dir: string;
  /** checkRunDir's verdict: undefined when fine. */
  dirError?: { code: string; message: string };
  balancer?: { routes: number } | { code: string; message: string } | 'missing';
}

export function checkRunDirFacts(f: RunDirFacts): CheckResult[] {
  const out: CheckResult[] = [];
  if (f.dirError) {
    const missing = f.dirError.code === 'ENOENT';
    out.push({
      verdict: 'FAIL',
      check: 'run dir',
      seen: missing ? `${printable(f.dir)} does not exist` : printable(f.dirError.message),
      fix: missing ? `start the agent with --run-dir ${printable(f.dir)} (it creates it), or give doctor the --run-dir the agent uses` : `chown the directory to the user loopmesh runs as and chmod 755 it, or use another --run-dir`,
    });
    return out;
  }
  out.push({ verdict: 'ok', check: 'run dir', seen: `${printable(f.dir)}: a directory of this user, not writable by group or others` });
  const b = f.balancer;
  if (b === undefined) return out;
  if (b === 'missing') out.push({ verdict: 'warn', check: 'balancer.json', seen: `${printable(join(f.dir, balancerFile))} does not exist (nothing rendered yet)`, fix: 'start the agent with this --run-dir; it renders on its first sync with Consul' });
  else if ('routes' in b) out.push({ verdict: 'ok', check: 'balancer.json', seen: `parses: ${b.routes} services` });
  else out.push({ verdict: 'FAIL', check: 'balancer.json', seen: `${b.code}: ${printable(clip(b.message, 300))}`, fix: 'the data plane will not load it: see the agent log for the render; delete the file and let the agent render it again' });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Output

export function formatResults(results: readonly CheckResult[]): string {
  return results
    .map((r) => {
      const head = `${r.verdict.padEnd(4)}  ${printable(r.check)}: ${printable(r.seen)}`;
      return r.fix && r.verdict !== 'ok' ? `${head}\n      fix: ${printable(r.fix)}` : head;
    })
    .join('\n');
}

export function exitStatus(results: readonly CheckResult[]): number {
  return results.some((r) => r.verdict === 'FAIL') ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// I/O: gathering the facts

/** "ECONNREFUSED" for a system error, else the message (never LM_ERR_UNKNOWN). */
function errorText(err: unknown): string {
  const code = isRecord(err) && typeof err.code === 'string' ? err.code : undefined;
  if (code && /^E[A-Z]+$/.test(code)) return code;
  if (err instanceof AggregateError && err.errors.length > 0) return errorText(err.errors[0]);
  return errorMessage(err);
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expire = new Promise<T>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([p, expire]).finally(() => clearTimeout(timer));
}

async function readText(path: string): Promise<{ text: string } | { error: string }> {
  try {
    return { text: await readFile(path, 'utf8') };
  } catch (err) {
    return { error: `${errorCode(err)}: ${errorMessage(err)}` };
  }
}

export function tcpConnect(host: string, port: number, timeoutMs = 3000): Promise<ConnectResult> {
  const start = performance.now();
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    const done = (r: ConnectResult): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => done({ ok: false, error: `no answer within ${timeoutMs} ms` }), timeoutMs);
    socket.once('connect', () => done({ ok: true, ms: Math.round(performance.now() - start) }));
    socket.once('error', (err) => done({ ok: false, error: errorText(err) }));
  });
}

async function resolveName(name: string): Promise<LookupResult> {
  try {
    const found = await withTimeout(lookup(name, { all: true, verbatim: true }), 10_000, `getaddrinfo(${name})`);
    return { addresses: found.map((a) => a.address) };
  } catch (err) {
    return { error: errorText(err) };
  }
}

async function readAdmin(config: AgentConfig): Promise<AdminFacts> {
  if (!config.admin) return { state: 'off' };
  const host = config.admin.host.includes(':') ? `[${config.admin.host}]` : config.admin.host;
  const url = `http://${host}:${config.admin.port}/v1/routes`;
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(5000) });
    if (!res.ok) return { state: 'invalid', url, error: `HTTP ${res.status}` };
    const text = await res.text();
    try {
      return { state: 'answered', url, report: parseStatusReport(JSON.parse(text)) };
    } catch (err) {
      return { state: 'invalid', url, error: err instanceof SyntaxError ? `not JSON: ${clip(JSON.stringify(text), 80)}` : errorMessage(err) };
    }
  } catch (err) {
    const cause = (err as { cause?: unknown }).cause;
    return { state: 'unreachable', url, error: cause ? errorText(cause) : errorText(err) };
  }
}

/** One request to Consul with the agent's TLS settings and token; read-only (GET, and POST to acl/authorize which changes nothing). */
function consulRequest(config: AgentConfig, method: 'GET' | 'POST', path: string, body?: string): Promise<{ status: number; body: string }> {
  const url = new URL(path, config.consul);
  const tls = config.consulTls;
  const headers: Record<string, string> = config.token ? { 'x-consul-token': config.token } : {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  const options = {
    method,
    headers,
    timeout: 5000,
    ...(url.protocol === 'https:' ? { ca: tls?.ca, cert: tls?.cert, key: tls?.key, servername: tls?.serverName, minVersion: 'TLSv1.2' as const } : {}),
  };
  return new Promise((resolve, reject) => {
    const req = (url.protocol === 'https:' ? httpsRequest : httpRequest)(url, options, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size <= 1 << 20) chunks.push(c);
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: no answer within 5000 ms`)));
    req.on('error', reject);
    req.end(body);
  });
}

async function readConsul(config: AgentConfig, routes: readonly DoctorRoute[], node: string | undefined): Promise<ConsulFacts> {
  const tokenGiven = config.token !== undefined && config.token !== '';
  let client: ConsulClient | undefined;
  const facts: ConsulFacts = { url: config.consul, leader: { ok: false, error: '', code: '' }, tokenGiven };
  try {
    client = new ConsulClient(consulClientOptions(config, silentLogger()));
    facts.leader = { ok: true, leader: await withTimeout(client.leader(), 8000, `Consul at ${config.consul}`) };
  } catch (err) {
    facts.leader = { ok: false, error: errorMessage(err), code: errorCode(err) };
    return facts;
  } finally {
    client?.close();
  }
  try {
    facts.token = await consulRequest(config, 'GET', '/v1/acl/token/self');
  } catch (err) {
    facts.token = { error: errorMessage(err) };
    return facts;
  }
  if (facts.token.status !== 200) return facts;
  const addresses = `${config.kvPrefix}/addresses`;
  const asked: Array<{ Resource: string; Access: string; Segment?: string; what: string; needed: string }> = [
    { Resource: 'key', Access: 'read', Segment: addresses, what: `key:read ${addresses}`, needed: 'the address table' },
    { Resource: 'key', Access: 'write', Segment: addresses, what: `key:write ${addresses}`, needed: 'new services get no address' },
    { Resource: 'key', Access: 'read', Segment: `${config.kvPrefix}/traffic/`, what: `key:read ${config.kvPrefix}/traffic/`, needed: 'traffic splits and policies' },
    { Resource: 'node', Access: 'read', Segment: node ?? '', what: node ? `node:read ${node}` : 'node:read', needed: 'the catalog lists no instance without it' },
  ];
  const services = routes.length > 0 ? routes.slice(0, 20).map((r) => r.service) : [''];
  for (const s of services) asked.push({ Resource: 'service', Access: 'read', Segment: s, what: s ? `service:read ${s}` : 'service:read', needed: 'reading the catalog' });
  try {
    const res = await consulRequest(config, 'POST', '/v1/internal/acl/authorize', JSON.stringify(asked.map(({ Resource, Access, Segment }) => ({ Resource, Access, Segment }))));
    if (res.status !== 200) throw new Error(`HTTP ${res.status}: ${clip(res.body.trim(), 100)}`);
    const answers = JSON.parse(res.body) as unknown;
    if (!Array.isArray(answers) || answers.length !== asked.length) throw new Error('an answer of another shape than asked');
    facts.rights = asked.map((a, i) => {
      const answer: unknown = answers[i];
      return { what: a.what, needed: a.needed, allowed: isRecord(answer) && answer.Allow === true };
    });
  } catch (err) {
    facts.rightsError = errorMessage(err);
  }
  return facts;
}

/** A run dir of root's, not writable by others, is fine too: doctor may run as another user than the agent. */
async function ownedByRoot(dir: string): Promise<boolean> {
  try {
    const info = await stat(dir);
    return info.isDirectory() && info.uid === 0 && (info.mode & 0o022) === 0;
  } catch {
    return false;
  }
}

async function readRunDir(dir: string): Promise<{ facts: RunDirFacts; routes: DoctorRoute[] | undefined }> {
  let rootOwned = false;
  try {
    await checkRunDir(dir);
  } catch (err) {
    rootOwned = errorCode(err) === codes.runDirUnsafe && (await ownedByRoot(dir));
    if (!rootOwned) return { facts: { dir, dirError: { code: errorCode(err), message: errorMessage(err) } }, routes: undefined };
  }
  const path = join(dir, balancerFile);
  let text: string;
  try {
    // readRunDirFile checks the file as the data plane does (a regular file of this user or root, not writable by others).
    text = rootOwned ? await readFile(path, 'utf8') : (await readRunDirFile(path)).toString('utf8');
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return { facts: { dir, balancer: 'missing' }, routes: undefined };
    return { facts: { dir, balancer: { code: errorCode(err), message: errorMessage(err) } }, routes: undefined };
  }
  try {
    const config = parseBalancerConfig(text, path);
    return {
      facts: { dir, balancer: { routes: config.services.length } },
      routes: config.services.map((s) => ({ service: s.service, fqdn: s.fqdn, address: s.address, port: s.port, listening: null, gateways: (s.gateways ?? []).map((g) => ({ id: g.id, address: g.address, port: g.port })) })),
    };
  } catch (err) {
    return { facts: { dir, balancer: { code: errorCode(err), message: errorMessage(err) } }, routes: undefined };
  }
}

async function readListeners(): Promise<Listener[] | undefined> {
  try {
    const r = await execa('ss', ['-lntpH'], { timeout: 5000 });
    return parseSs(r.stdout);
  } catch {
    const proc = await readText('/proc/net/tcp');
    return 'text' in proc ? parseProcNetTcp(proc.text) : undefined;
  }
}

const exists = (path: string): Promise<boolean> => stat(path).then(() => true, () => false);

/** Every check, in order: admin and routes, run dir, names, data plane and ports, gateways, Consul. */
export async function runDoctor(config: AgentConfig, paths = { nsswitch: '/etc/nsswitch.conf', hosts: '/etc/hosts', resolvConf: '/etc/resolv.conf' }): Promise<CheckResult[]> {
  const [admin, runDir, listeners] = await Promise.all([readAdmin(config), readRunDir(config.runDir), readListeners()]);
  const fromReport = admin.state === 'answered' ? reportRoutes(admin.report).routes : undefined;
  const routes = fromReport ?? runDir.routes ?? [];
  const results: CheckResult[] = [...checkAdmin(admin, fromReport ? undefined : runDir.routes ? { routes: runDir.routes.length } : undefined)];
  results.push(...checkRunDirFacts(runDir.facts));
  if (routes.length === 0) results.push({ verdict: 'warn', check: 'routes', seen: 'no routes to check (nothing registered in Consul yet, or the agent has not synced)' });

  // Names: getaddrinfo for each, then the facts that explain a miss.
  const lookups = await Promise.all(routes.map((r) => resolveName(r.fqdn)));
  const failed = routes.some((r, i) => {
    const l = lookups[i];
    return !l || 'error' in l || l.addresses[0] !== r.address;
  });
  const [nss, resolv, hostsText, avahi] = await Promise.all([readText(paths.nsswitch), readText(paths.resolvConf), config.hostsFile ? readText(config.hostsFile) : Promise.resolve(undefined), Promise.all(['/run/avahi-daemon/socket', '/var/run/avahi-daemon/socket'].map(exists))]);
  const nssCheck = checkNsswitch({
    nsswitchPath: paths.nsswitch,
    nsswitch: 'text' in nss ? nss.text : undefined,
    ...('error' in nss ? { nsswitchError: nss.error } : {}),
    avahiRunning: avahi.some(Boolean),
    resolvConf: 'text' in resolv ? resolv.text : undefined,
    lookupsFailed: failed,
    suffix: config.suffix,
  });
  const hostsChecks = checkHostsFile({ path: config.hostsFile, text: hostsText && 'text' in hostsText ? hostsText.text : undefined, ...(hostsText && 'error' in hostsText ? { error: hostsText.error } : {}), systemPath: paths.hosts }, routes);
  results.push(nssCheck, ...hostsChecks);
  routes.forEach((r, i) => {
    // The nsswitch line, and the hosts file lines about this name or about no name in particular.
    const why = [nssCheck, ...hostsChecks.filter((c) => c.seen.includes(r.fqdn) || !routes.some((o) => c.seen.includes(o.fqdn)))];
    results.push(checkResolution(r, lookups[i] ?? { error: 'not looked up' }, why));
  });

  // The data plane: a connect to each route; who holds each port.
  const connects = await Promise.all(routes.map((r) => tcpConnect(r.address, r.port)));
  const loopmeshPids = new Set<number>();
  if (config.admin && listeners) for (const l of listeners) if (l.port === config.admin.port && l.pid !== undefined && (l.address === config.admin.host || wildcard(l.address))) loopmeshPids.add(l.pid);
  routes.forEach((r, i) => {
    results.push(checkDataPlane(r, connects[i] ?? { ok: false, error: 'not tried' }));
    results.push(checkPort(r, listeners, loopmeshPids));
  });

  // Gateways.
  for (const r of routes) {
    const tried = await Promise.all(r.gateways.map(async (g) => ({ gateway: g, result: await tcpConnect(g.address, g.port) })));
    const c = checkGateways(r, tried);
    if (c) results.push(c);
  }

  results.push(...checkConsul(await readConsul(config, routes, admin.state === 'answered' ? admin.report.node : undefined)));
  return results;
}

/** The flags doctor takes: where the agent's pieces are, and how to reach Consul. */
const doctorFlags = ['consul', 'consul-ssl', 'ca-file', 'client-cert', 'client-key', 'tls-server-name', 'token', 'token-file', 'datacenter', 'admin', 'run-dir', 'hosts-file', 'suffix', 'kv-prefix', 'range', 'gateway-service'];

export async function runDoctorCommand(argv: string[]): Promise<number> {
  const flags = parseFlags(argv, { config: { type: 'string' } }, doctorFlags);
  if (flags.help) {
    process.stdout.write(usage.doctor);
    return 0;
  }
  const config = loadConfig(flags, process.env);
  const exposed = tokenInArgv(flags);
  if (exposed) process.stderr.write(`loopmesh: warning ${exposed.code}: ${exposed.message}\n`);
  const results = await runDoctor(config);
  const fails = results.filter((r) => r.verdict === 'FAIL').length;
  const warns = results.filter((r) => r.verdict === 'warn').length;
  const warnings = `${warns} warning${warns === 1 ? '' : 's'}`;
  process.stdout.write(`${formatResults(results)}\n\n${fails === 0 ? `all fine${warns ? ` (${warnings})` : ''}` : `${fails} problem${fails === 1 ? '' : 's'}${warns ? `, ${warnings}` : ''}`}\n`);
  return exitStatus(results);
}
