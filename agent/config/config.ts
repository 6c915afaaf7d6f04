import { isIP } from 'node:net';
import { readFileSync } from 'node:fs';
import type { LevelWithSilent } from 'pino';
import { emptyPolicies, type EmptyPolicy } from '../balancer/config.js';
import { ConfigError, codes } from '../errors.js';
import { logLevels } from '../log.js';
import { parseRange, type AddressRange } from '../plan/addresses.js';
import { isValidSuffix } from '../plan/names.js';
import { describe, isRecord, parseHostPort } from '../validate.js';

export interface Endpoint {
  host: string;
  port: number;
}

/** The whole configuration, validated once at start-up. */
export interface AgentConfig {
  consul: string;
  token: string | undefined;
  datacenter: string | undefined;
  runDir: string;
  templates: string | undefined;
  /** undefined: no hosts-file block. */
  hostsFile: string | undefined;
  /** undefined: no DNS responder. */
  dns: Endpoint | undefined;
  /** undefined: no admin HTTP. */
  admin: Endpoint | undefined;
  suffix: string;
  range: AddressRange;
  logLevel: LevelWithSilent;
  services: string[];
  tag: string | undefined;
  allowWarning: boolean;
  /** Watch, plan and render only; a separate `loopmesh balancer` serves the run dir. */
  renderOnly: boolean;
  empty: EmptyPolicy;
  kvPrefix: string;
  drainTimeoutMs: number;
  connectTimeoutMs: number;
}

/** Each setting: its flag, its environment variable, its config-file key, and how to read it. */
interface Setting {
  key: string;
  flag: string;
  env: string[];
  value: string;
  help: string;
  boolean?: boolean;
  default?: string;
}

export const settings: readonly Setting[] = [
  { key: 'consul', flag: 'consul', env: ['LOOPMESH_CONSUL', 'CONSUL_HTTP_ADDR'], value: 'URL', default: 'http://127.0.0.1:8500', help: "Consul agent's HTTP address" },
  { key: 'token', flag: 'token', env: ['LOOPMESH_TOKEN', 'CONSUL_HTTP_TOKEN'], value: 'TOKEN', help: 'Consul ACL token' },
  { key: 'tokenFile', flag: 'token-file', env: ['LOOPMESH_TOKEN_FILE', 'CONSUL_HTTP_TOKEN_FILE'], value: 'FILE', help: 'file holding the Consul ACL token' },
  { key: 'datacenter', flag: 'datacenter', env: ['LOOPMESH_DATACENTER'], value: 'DC', help: "datacenter to route (default: the agent's own)" },
  { key: 'runDir', flag: 'run-dir', env: ['LOOPMESH_RUN_DIR'], value: 'DIR', default: '/run/loopmesh', help: 'where rendered files go' },
  { key: 'templates', flag: 'templates', env: ['LOOPMESH_TEMPLATES'], value: 'DIR', help: 'your templates; override the built-in ones by file name' },
  { key: 'hostsFile', flag: 'hosts-file', env: ['LOOPMESH_HOSTS_FILE'], value: 'FILE|off', default: '/etc/hosts', help: 'hosts file that gets the loopmesh block' },
  { key: 'dns', flag: 'dns', env: ['LOOPMESH_DNS'], value: 'ADDR:PORT|off', default: '127.0.0.1:8653', help: 'DNS responder (UDP and TCP)' },
  { key: 'admin', flag: 'admin', env: ['LOOPMESH_ADMIN'], value: 'ADDR:PORT|off', default: '127.0.0.1:9190', help: 'admin HTTP: /health, /v1/routes, /metrics' },
  { key: 'suffix', flag: 'suffix', env: ['LOOPMESH_SUFFIX'], value: 'DOMAIN', default: 'local', help: 'names are NAME.DOMAIN' },
  { key: 'range', flag: 'range', env: ['LOOPMESH_RANGE'], value: 'CIDR', default: '127.77.0.0/16', help: 'service addresses come from this range in 127/8' },
  { key: 'logLevel', flag: 'log-level', env: ['LOOPMESH_LOG_LEVEL'], value: 'LEVEL', default: 'info', help: logLevels.join('|') },
  { key: 'services', flag: 'services', env: ['LOOPMESH_SERVICES'], value: 'A,B', help: 'route only these services (default: all)' },
  { key: 'tag', flag: 'tag', env: ['LOOPMESH_TAG'], value: 'TAG', help: 'route only services with this tag' },
  { key: 'allowWarning', flag: 'allow-warning', env: ['LOOPMESH_ALLOW_WARNING'], value: '', boolean: true, help: 'count instances in "warning" as healthy' },
  { key: 'renderOnly', flag: 'render-only', env: ['LOOPMESH_RENDER_ONLY'], value: '', boolean: true, help: "only watch, plan and render into --run-dir; 'loopmesh balancer' on that dir serves, so either restarts alone" },
  { key: 'empty', flag: 'empty', env: ['LOOPMESH_EMPTY'], value: emptyPolicies.join('|'), default: 'reject', help: 'when a service has no healthy instance' },
  { key: 'kvPrefix', flag: 'kv-prefix', env: ['LOOPMESH_KV_PREFIX'], value: 'PREFIX', default: 'loopmesh', help: 'Consul KV prefix for the address table' },
  { key: 'drainTimeout', flag: 'drain-timeout', env: ['LOOPMESH_DRAIN_TIMEOUT'], value: 'SECONDS', default: '30', help: "how long a removed service's connections may drain" },
  { key: 'connectTimeout', flag: 'connect-timeout', env: ['LOOPMESH_CONNECT_TIMEOUT'], value: 'SECONDS', default: '2', help: 'connect timeout to a backend before trying another' },
];

/** Raw values by setting key, as strings (booleans as "true"/"false"). */
export type RawConfig = Record<string, string | undefined>;

function invalid(message: string): ConfigError {
  return new ConfigError(codes.configInvalid, message);
}

/** A JSON config file with the same keys as the settings (camelCase), e.g. {"consul": "..."}. */
export function readConfigFile(path: string): RawConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(codes.configFile, `config file ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(codes.configFile, `config file ${path}: expected JSON, ${(err as Error).message}`);
  }
  if (!isRecord(json)) throw new ConfigError(codes.configFile, `config file ${path}: expected a JSON object, got ${describe(json)}`);
  const out: RawConfig = {};
  for (const [key, value] of Object.entries(json)) {
    const setting = settings.find((s) => s.key === key);
    if (!setting) throw new ConfigError(codes.configFile, `config file ${path}: unknown key "${key}"; expected one of ${settings.map((s) => s.key).join(', ')}`);
    if (setting.boolean) {
      if (typeof value !== 'boolean') throw new ConfigError(codes.configFile, `config file ${path}: "${key}": expected true or false, got ${describe(value)}`);
      out[key] = String(value);
    } else if (key === 'services' && Array.isArray(value) && value.every((v) => typeof v === 'string')) {
      out[key] = value.join(',');
    } else if (typeof value === 'string' || typeof value === 'number') {
      out[key] = String(value);
    } else {
      throw new ConfigError(codes.configFile, `config file ${path}: "${key}": expected a string, got ${describe(value)}`);
    }
  }
  return out;
}

export function readEnv(env: NodeJS.ProcessEnv): RawConfig {
  const out: RawConfig = {};
  for (const s of settings) {
    const name = s.env.find((e) => env[e] !== undefined && env[e] !== '');
    if (name) out[s.key] = env[name];
  }
  return out;
}

function endpoint(value: string, flag: string): Endpoint | undefined {
  if (value === 'off') return undefined;
  let parsed: Endpoint;
  try {
    parsed = parseHostPort(value, `--${flag}`);
  } catch (err) {
    throw invalid(`${(err as Error).message}, or "off"`);
  }
  if (isIP(parsed.host) === 0 && parsed.host !== 'localhost') {
    throw invalid(`--${flag}: expected an IP address before the port (for example 127.0.0.1:${parsed.port}), got "${parsed.host}" in "${value}"`);
  }
  return parsed;
}

function seconds(value: string, flag: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0 || n > 86_400) throw invalid(`--${flag}: expected a number of seconds from 0 to 86400, got "${value}"`);
  return Math.round(n * 1000);
}

function bool(value: string, flag: string): boolean {
  if (['true', '1', 'yes'].includes(value)) return true;
  if (['false', '0', 'no', ''].includes(value)) return false;
  throw invalid(`--${flag}: expected true or false, got "${value}"`);
}

/** Layers (later wins) -> a validated AgentConfig, or a ConfigError naming the bad value. */
export function resolveConfig(...layers: RawConfig[]): AgentConfig {
  const raw: Record<string, string> = {};
  for (const s of settings) if (s.default !== undefined) raw[s.key] = s.default;
  for (const layer of layers) for (const [k, v] of Object.entries(layer)) if (v !== undefined) raw[k] = v;
  const get = (key: string): string => raw[key] ?? '';
  const opt = (key: string): string | undefined => (raw[key] === undefined || raw[key] === '' ? undefined : raw[key]);

  let consul: URL;
  try {
    consul = new URL(get('consul').includes('://') ? get('consul') : `http://${get('consul')}`);
    if (consul.protocol !== 'http:' && consul.protocol !== 'https:') throw new Error();
  } catch {
    throw invalid(`--consul: expected a URL such as http://127.0.0.1:8500, got "${get('consul')}"`);
  }

  let token = opt('token');
  const tokenFile = opt('tokenFile');
  if (token === undefined && tokenFile !== undefined) {
    try {
      token = readFileSync(tokenFile, 'utf8').trim();
    } catch (err) {
      throw invalid(`--token-file: cannot read "${tokenFile}" (${(err as NodeJS.ErrnoException).code ?? 'error'}); expected a readable file holding a Consul token`);
    }
  }

  const suffix = get('suffix').toLowerCase().replace(/^\.+|\.+$/g, '');
  if (!isValidSuffix(suffix)) throw invalid(`--suffix: expected a DNS domain such as "local" or "mesh.internal", got "${get('suffix')}"`);

  let range: AddressRange;
  try {
    range = parseRange(get('range'));
  } catch (err) {
    throw invalid(`--range: ${(err as Error).message}`);
  }

  const logLevel = get('logLevel') as LevelWithSilent;
  if (!logLevels.includes(logLevel)) throw invalid(`--log-level: expected one of ${logLevels.join(', ')}, got "${get('logLevel')}"`);

  const empty = get('empty') as EmptyPolicy;
  if (!emptyPolicies.includes(empty)) throw invalid(`--empty: expected one of ${emptyPolicies.join(', ')}, got "${get('empty')}"`);

  const kvPrefix = get('kvPrefix').replace(/^\/+|\/+$/g, '');
  if (!/^[A-Za-z0-9._/-]+$/.test(kvPrefix)) throw invalid(`--kv-prefix: expected a Consul KV path such as "loopmesh", got "${get('kvPrefix')}"`);

  const hostsFile = get('hostsFile');
  if (hostsFile === '') throw invalid('--hosts-file: expected a file path or "off", got ""');

  return {
    consul: consul.origin,
    token,
    datacenter: opt('datacenter'),
    runDir: get('runDir'),
    templates: opt('templates'),
    hostsFile: hostsFile === 'off' ? undefined : hostsFile,
    dns: endpoint(get('dns'), 'dns'),
    admin: endpoint(get('admin'), 'admin'),
    suffix,
    range,
    logLevel,
    services: (opt('services') ?? '').split(',').map((s) => s.trim()).filter(Boolean),
    tag: opt('tag'),
    allowWarning: bool(get('allowWarning'), 'allow-warning'),
    renderOnly: bool(get('renderOnly'), 'render-only'),
    empty,
    kvPrefix,
    drainTimeoutMs: seconds(get('drainTimeout'), 'drain-timeout'),
    connectTimeoutMs: Math.max(1, seconds(get('connectTimeout'), 'connect-timeout')),
  };
}
