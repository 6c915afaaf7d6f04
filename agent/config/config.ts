import { maxWatchesCeiling } from '../consul/service-watcher.js';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import type { LevelWithSilent } from 'pino';
import { balancePolicies, drainPolicies, emptyPolicies, type BalancePolicy, type DrainPolicy, type EmptyPolicy } from '../contract/balancer-config.js';
import { ConfigError, codes } from '../errors.js';
import { logLevels } from '../log.js';
import { parseGatewayRange, parseRange, type AddressRange } from '../plan/addresses.js';
import { isValidSuffix } from '../plan/names.js';
import { describe, isRecord, parseHostPort } from '../validate.js';

export interface Endpoint {
  host: string;
  port: number;
}

/** TLS to Consul, files already read and checked; PEM text as node's tls options take it. */
export interface ConsulTls {
  caFile: string | undefined;
  ca: string | undefined;
  certFile: string | undefined;
  cert: string | undefined;
  keyFile: string | undefined;
  key: string | undefined;
  /** The name Consul's certificate must hold (and SNI), when not the host of --consul. */
  serverName: string | undefined;
}

/** The whole configuration, validated once at start-up. */
export interface AgentConfig {
  consul: string;
  /** undefined: plain HTTP (only with an http:// address). */
  consulTls: ConsulTls | undefined;
  /** The token at start-up; with tokenFile, the file is read again when it changes. */
  token: string | undefined;
  tokenFile: string | undefined;
  datacenter: string | undefined;
  runDir: string;
  templates: string | undefined;
  /** undefined: no hosts-file block. */
  hostsFile: string | undefined;
  /** undefined: no DNS responder. */
  dns: Endpoint | undefined;
  /** undefined: no admin HTTP. */
  admin: Endpoint | undefined;
  /** --admin outside loopback was asked for on purpose. */
  adminPublic: boolean;
  suffix: string;
  range: AddressRange;
  logLevel: LevelWithSilent;
  services: string[];
  /** A Consul KV key holding the list of services to route (--services-kv); watched, so the list changes live. */
  servicesKv: string | undefined;
  /** Most per-service long polls (the explicit-list modes); a longer list is watched catalog-wide. */
  maxWatches: number;
  tag: string | undefined;
  allowWarning: boolean;
  /** Watch, plan and render only; a separate `loopmesh balancer` serves the run dir. */
  renderOnly: boolean;
  empty: EmptyPolicy;
  kvPrefix: string;
  drainTimeoutMs: number;
  /** Hot restart (SIGUSR2): how long the new process gets to take the sockets over and serve. */
  handoverTimeoutMs: number;
  connectTimeoutMs: number;
  /** A balanced connection with no bytes either way for this long is closed on both sides. */
  idleTimeoutMs: number;
  /** How long each blocking query to Consul may wait for a change. */
  consulWaitMs: number;
  /** The balancing policy of a service that sets none (meta loopmesh-lb or the KV traffic document). */
  lbPolicy: BalancePolicy;
  /** Concurrent client connections per service; 0 is no limit. */
  maxConnections: number;
  /** Connections waiting for a slot when a service is at maxConnections; 0 refuses at once. */
  queue: number;
  queueTimeoutMs: number;
  /** What happens to open connections of a backend that left the healthy set. */
  backendDrain: DrainPolicy;
  /** `loopmesh balancer` processes sharing every listening socket (1: one process, no supervisor). */
  workers: number;
  /** The Consul service of the proxy cluster; undefined ("off"): no gateways, no fallback. */
  gatewayService: string | undefined;
  /** `loopmesh gateway` only: where it serves every service, reachable from the other nodes. */
  gatewayRange: AddressRange | undefined;
  /** `loopmesh gateway` only: its service ID in Consul (default loopmesh-gateway-BASE of its range). */
  gatewayId: string | undefined;
  /** `loopmesh gateway` only: the URL Consul's HTTP check of the gateway asks (default: its admin /health). */
  gatewayCheck: string | undefined;
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
  { key: 'consul', flag: 'consul', env: ['LOOPMESH_CONSUL', 'CONSUL_HTTP_ADDR'], value: 'URL', default: '127.0.0.1:8500', help: "Consul agent's address; without a scheme http://, or https:// with --consul-ssl" },
  { key: 'consulSsl', flag: 'consul-ssl', env: ['LOOPMESH_CONSUL_SSL', 'CONSUL_HTTP_SSL'], value: '', boolean: true, help: 'https:// for a --consul address given without a scheme' },
  { key: 'caFile', flag: 'ca-file', env: ['LOOPMESH_CA_FILE', 'CONSUL_CACERT'], value: 'FILE', help: "PEM CA certificate(s) that Consul's HTTPS certificate must chain to (default: the system's)" },
  { key: 'clientCert', flag: 'client-cert', env: ['LOOPMESH_CLIENT_CERT', 'CONSUL_CLIENT_CERT'], value: 'FILE', help: 'PEM client certificate for Consul (verify_incoming); needs --client-key' },
  { key: 'clientKey', flag: 'client-key', env: ['LOOPMESH_CLIENT_KEY', 'CONSUL_CLIENT_KEY'], value: 'FILE', help: 'PEM private key of --client-cert' },
  { key: 'tlsServerName', flag: 'tls-server-name', env: ['LOOPMESH_TLS_SERVER_NAME', 'CONSUL_TLS_SERVER_NAME'], value: 'NAME', help: "name Consul's certificate must hold, when not the host of --consul (e.g. server.dc1.consul)" },
  { key: 'token', flag: 'token', env: ['LOOPMESH_TOKEN', 'CONSUL_HTTP_TOKEN'], value: 'TOKEN', help: 'Consul ACL token; on the command line every local user sees it (ps), so prefer the environment or --token-file' },
  { key: 'tokenFile', flag: 'token-file', env: ['LOOPMESH_TOKEN_FILE', 'CONSUL_HTTP_TOKEN_FILE'], value: 'FILE', help: 'file holding the Consul ACL token; read again when it changes (rotation without a restart)' },
  { key: 'datacenter', flag: 'datacenter', env: ['LOOPMESH_DATACENTER'], value: 'DC', help: "datacenter to route (default: the agent's own)" },
  { key: 'runDir', flag: 'run-dir', env: ['LOOPMESH_RUN_DIR'], value: 'DIR', default: '/run/loopmesh', help: 'where rendered files go' },
  { key: 'templates', flag: 'templates', env: ['LOOPMESH_TEMPLATES'], value: 'DIR', help: 'your templates; override the built-in ones by file name' },
  { key: 'hostsFile', flag: 'hosts-file', env: ['LOOPMESH_HOSTS_FILE'], value: 'FILE|off', default: '/etc/hosts', help: 'hosts file that gets the loopmesh block' },
  { key: 'dns', flag: 'dns', env: ['LOOPMESH_DNS'], value: 'ADDR:PORT|off', default: '127.0.0.1:8653', help: 'DNS responder (UDP and TCP)' },
  { key: 'admin', flag: 'admin', env: ['LOOPMESH_ADMIN'], value: 'ADDR:PORT|off', default: '127.0.0.1:9190', help: 'admin HTTP: /health, /v1/routes, /metrics; loopback only unless --admin-public' },
  { key: 'adminPublic', flag: 'admin-public', env: ['LOOPMESH_ADMIN_PUBLIC'], value: '', boolean: true, help: 'allow --admin on a non-loopback address: whoever reaches it reads routes and metrics' },
  { key: 'suffix', flag: 'suffix', env: ['LOOPMESH_SUFFIX'], value: 'DOMAIN', default: 'local', help: 'names are NAME.DOMAIN' },
  { key: 'range', flag: 'range', env: ['LOOPMESH_RANGE'], value: 'CIDR', default: '127.77.0.0/16', help: 'service addresses come from this range in 127/8' },
  { key: 'logLevel', flag: 'log-level', env: ['LOOPMESH_LOG_LEVEL'], value: 'LEVEL', default: 'info', help: logLevels.join('|') },
  { key: 'services', flag: 'services', env: ['LOOPMESH_SERVICES'], value: 'A,B', help: 'route only these services (default: all)' },
  { key: 'servicesKv', flag: 'services-kv', env: ['LOOPMESH_SERVICES_KV'], value: 'KEY', help: 'route only the services listed in this Consul KV key (a JSON array, or names separated by commas or new lines); the list is watched and changes live' },
  { key: 'maxWatches', flag: 'max-watches', env: ['LOOPMESH_MAX_WATCHES'], value: 'N', default: '100', help: `--services or --services-kv lists up to N services get one long poll each (exact, costs only what changed); a longer list, or all services, is watched catalog-wide, where on a large catalog up to N nodes get a change signal each (0 to ${maxWatchesCeiling}: Consul allows 200 connections per client)` },
  { key: 'tag', flag: 'tag', env: ['LOOPMESH_TAG'], value: 'TAG', help: 'route only services with this tag' },
  { key: 'allowWarning', flag: 'allow-warning', env: ['LOOPMESH_ALLOW_WARNING'], value: '', boolean: true, help: 'count instances in "warning" as healthy' },
  { key: 'renderOnly', flag: 'render-only', env: ['LOOPMESH_RENDER_ONLY'], value: '', boolean: true, help: "only watch, plan and render into --run-dir; 'loopmesh balancer' on that dir serves, so either restarts alone" },
  { key: 'empty', flag: 'empty', env: ['LOOPMESH_EMPTY'], value: emptyPolicies.join('|'), default: 'reject', help: 'when a service has no healthy instance' },
  { key: 'kvPrefix', flag: 'kv-prefix', env: ['LOOPMESH_KV_PREFIX'], value: 'PREFIX', default: 'loopmesh', help: 'Consul KV prefix: PREFIX/addresses (the address table) and PREFIX/traffic/NAME (splits, policy, limits)' },
  { key: 'drainTimeout', flag: 'drain-timeout', env: ['LOOPMESH_DRAIN_TIMEOUT'], value: 'SECONDS', default: '30', help: "how long a removed service's connections may drain" },
  { key: 'handoverTimeout', flag: 'handover-timeout', env: ['LOOPMESH_HANDOVER_TIMEOUT'], value: 'SECONDS', default: '15', help: 'hot restart (SIGUSR2): how long the new process gets to take over the sockets and serve; past it the old one keeps serving (1 to 600; raise it where Node.js starts slowly, e.g. under CPU emulation)' },
  { key: 'connectTimeout', flag: 'connect-timeout', env: ['LOOPMESH_CONNECT_TIMEOUT'], value: 'SECONDS', default: '2', help: 'connect timeout to a backend before trying another' },
  { key: 'idleTimeout', flag: 'idle-timeout', env: ['LOOPMESH_IDLE_TIMEOUT'], value: 'SECONDS', default: '3600', help: 'close a balanced connection with no bytes either way for this long (both sides)' },
  { key: 'lbPolicy', flag: 'lb-policy', env: ['LOOPMESH_LB_POLICY'], value: balancePolicies.join('|'), default: 'p2c-ewma', help: 'balancing policy of a service that sets none (meta loopmesh-lb or KV traffic/NAME)' },
  { key: 'maxConnections', flag: 'max-connections', env: ['LOOPMESH_MAX_CONNECTIONS'], value: 'N', default: '0', help: 'concurrent client connections per service (0: no limit); KV traffic/NAME limits override' },
  { key: 'queue', flag: 'queue', env: ['LOOPMESH_QUEUE'], value: 'N', default: '0', help: 'connections that wait for a slot at --max-connections (0: refuse at once)' },
  { key: 'queueTimeout', flag: 'queue-timeout', env: ['LOOPMESH_QUEUE_TIMEOUT'], value: 'SECONDS', default: '5', help: 'how long a queued connection waits before it is refused' },
  { key: 'backendDrain', flag: 'backend-drain', env: ['LOOPMESH_BACKEND_DRAIN'], value: drainPolicies.join('|'), default: 'keep', help: "open connections of a backend that left the healthy set: keep them, cut them after --drain-timeout, or reset them at once" },
  { key: 'workers', flag: 'workers', env: ['LOOPMESH_WORKERS'], value: 'N|auto', default: '1', help: "loopmesh balancer only: worker processes that share every listening socket (1 to 64; auto: one per CPU)" },
  { key: 'gatewayService', flag: 'gateway-service', env: ['LOOPMESH_GATEWAY_SERVICE'], value: 'NAME|off', default: 'loopmesh-gateway', help: "Consul service of the proxy cluster (loopmesh gateway): each service's last resort, and its names' next addresses after the loopback one" },
  { key: 'gatewayRange', flag: 'gateway-range', env: ['LOOPMESH_GATEWAY_RANGE'], value: 'CIDR', help: 'loopmesh gateway only: addresses other nodes reach (an AnyIP local route) on which it serves every service, at the same offset as in --range' },
  { key: 'gatewayId', flag: 'gateway-id', env: ['LOOPMESH_GATEWAY_ID'], value: 'ID', help: "loopmesh gateway only: its service ID in Consul (default loopmesh-gateway-BASE, BASE its range's first address)" },
  { key: 'gatewayCheck', flag: 'gateway-check', env: ['LOOPMESH_GATEWAY_CHECK'], value: 'URL', help: "loopmesh gateway only: the URL of Consul's HTTP check of it (default: its --admin /health)" },
  { key: 'consulWait', flag: 'consul-wait', env: ['LOOPMESH_CONSUL_WAIT'], value: 'SECONDS', default: '60', help: "how long each blocking query to Consul waits for a change (1 to 600; Consul caps it at 10 minutes); a frozen Consul is noticed after about this plus max(1/8 of it, 5 s)" },
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
    throw invalid(`--${flag}: expected an IP address before the port (for example 127.0.0.1:${parsed.port}), got ${JSON.stringify(parsed.host)} in "${value}"`);
  }
  return parsed;
}

function seconds(value: string, flag: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0 || n > 86_400) throw invalid(`--${flag}: expected a number of seconds from 0 to 86400, got ${JSON.stringify(value)}`);
  return Math.round(n * 1000);
}

function handoverTimeout(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 1 || n > 600) throw invalid(`--handover-timeout: expected a number of seconds from 1 to 600, got ${JSON.stringify(value)}`);
  return Math.round(n * 1000);
}

function count(value: string, flag: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isInteger(n) || n < 0 || n > 1_000_000) throw invalid(`--${flag}: expected a whole number from 0 to 1000000, got ${JSON.stringify(value)}`);
  return n;
}

/** Whole seconds, because Consul's `wait` parameter is sent in whole seconds. */
function consulWait(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isInteger(n) || n < 1 || n > 600) throw invalid(`--consul-wait: expected a whole number of seconds from 1 to 600 (Consul caps a blocking wait at 10 minutes), got ${JSON.stringify(value)}`);
  return n * 1000;
}

/** --workers: 1 to 64 processes, or auto (one per CPU, at most 64). */
function workers(value: string): number {
  if (value.trim().toLowerCase() === 'auto') return Math.min(64, Math.max(1, availableParallelism()));
  const n = Number(value);
  if (value.trim() === '' || !Number.isInteger(n) || n < 1 || n > 64) throw invalid(`--workers: expected a whole number from 1 to 64, or "auto" (one per CPU), got ${JSON.stringify(value)}`);
  return n;
}

function maxWatches(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isInteger(n) || n < 0 || n > maxWatchesCeiling) {
    throw invalid(`--max-watches: expected a whole number from 0 to ${maxWatchesCeiling} (each is a connection to the local Consul agent, which allows 200 per client), got ${JSON.stringify(value)}`);
  }
  return n;
}

/** A KV key: no leading slash, no empty or dot segments, printable. */
function servicesKv(value: string | undefined, services: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  if (services !== undefined && services.trim() !== '') throw invalid('--services-kv and --services both name the services to route; expected one of them');
  if (!/^[A-Za-z0-9_.-]+(?:\/[A-Za-z0-9_.-]+)*$/.test(value) || value.split('/').some((seg) => seg === '.' || seg === '..') || value.length > 512) {
    throw invalid(`--services-kv: expected a Consul KV key like loopmesh/services/NODE (letters, digits, "_", ".", "-" in "/"-separated parts), got ${JSON.stringify(value)}`);
  }
  return value;
}

const consulName = /^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$/;

function gatewayService(value: string): string | undefined {
  if (value === 'off') return undefined;
  if (!consulName.test(value)) throw invalid(`--gateway-service: expected a Consul service name (letters, digits, "-", "_", ".", at most 128) or "off", got ${JSON.stringify(value)}`);
  return value;
}

function gatewayRange(value: string | undefined): AddressRange | undefined {
  if (value === undefined) return undefined;
  try {
    return parseGatewayRange(value);
  } catch (err) {
    throw invalid(`--gateway-range: ${(err as Error).message}`);
  }
}

function gatewayId(value: string | undefined): string | undefined {
  if (value !== undefined && !consulName.test(value)) throw invalid(`--gateway-id: expected a Consul service ID (letters, digits, "-", "_", ".", at most 128), got ${JSON.stringify(value)}`);
  return value;
}

function gatewayCheck(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw invalid(`--gateway-check: expected an http:// or https:// URL such as http://127.0.0.1:9190/health, got ${JSON.stringify(value)}`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw invalid(`--gateway-check: expected an http:// or https:// URL, got ${JSON.stringify(value)}`);
  return url.href;
}

function bool(value: string, flag: string): boolean {
  // Consul's CLI reads CONSUL_HTTP_SSL with Go's ParseBool, so "t" and "TRUE" mean true here too.
  const v = value.toLowerCase();
  if (['true', '1', 'yes', 't'].includes(v)) return true;
  if (['false', '0', 'no', 'f', ''].includes(v)) return false;
  throw invalid(`--${flag}: expected true or false, got ${JSON.stringify(value)}`);
}

const loopbackNames: ReadonlySet<string> = new Set(['localhost', '::1']);

/** 127.0.0.0/8, ::1 (and 127/8 mapped into IPv6), localhost: reachable from this host only. */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  if (loopbackNames.has(h)) return true;
  const v4 = h.startsWith('::ffff:') ? h.slice(7) : h;
  return isIP(v4) === 4 && v4.startsWith('127.');
}

/** Reads a file that must be there at start-up; the message names the setting, the file and the reason. */
function readSettingFile(path: string, flag: string, expected: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw invalid(`--${flag}: cannot read "${path}" (${(err as NodeJS.ErrnoException).code ?? String(err)}); expected ${expected}`);
  }
}

function readCertificates(path: string, flag: string): string {
  const pem = readSettingFile(path, flag, 'a readable PEM file of certificates');
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw invalid(`--${flag}: "${path}" holds no PEM certificate; expected "-----BEGIN CERTIFICATE-----" blocks`);
  for (const block of blocks) {
    try {
      new X509Certificate(block);
    } catch (err) {
      throw invalid(`--${flag}: "${path}" holds a certificate that cannot be parsed (${(err as Error).message}); expected PEM certificates`);
    }
  }
  return pem;
}

/** TLS settings, checked together: never a silent fallback to plain HTTP. */
function consulTls(get: (key: string) => string | undefined, url: URL, given: string): ConsulTls | undefined {
  const caFile = get('caFile');
  const certFile = get('clientCert');
  const keyFile = get('clientKey');
  const serverName = get('tlsServerName');
  const set = [caFile && '--ca-file (CONSUL_CACERT)', certFile && '--client-cert (CONSUL_CLIENT_CERT)', keyFile && '--client-key (CONSUL_CLIENT_KEY)', serverName && '--tls-server-name (CONSUL_TLS_SERVER_NAME)'].filter(Boolean);
  if (url.protocol === 'http:') {
    if (set.length === 0) return undefined;
    throw invalid(`${set.join(', ')} ${set.length === 1 ? 'is' : 'are'} set but --consul "${given}" is plain HTTP; expected an https:// address, or --consul-ssl (CONSUL_HTTP_SSL=true) with an address without a scheme`);
  }
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw invalid(certFile ? `--client-cert "${certFile}" is set without --client-key; expected both (CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY)` : `--client-key "${keyFile}" is set without --client-cert; expected both (CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY)`);
  }
  if (serverName !== undefined && !/^[A-Za-z0-9.-]{1,253}$/.test(serverName) && isIP(serverName) === 0) {
    throw invalid(`--tls-server-name: expected a DNS name such as server.dc1.consul, got ${JSON.stringify(serverName)}`);
  }
  const ca = caFile === undefined ? undefined : readCertificates(caFile, 'ca-file');
  const cert = certFile === undefined ? undefined : readCertificates(certFile, 'client-cert');
  let key: string | undefined;
  if (keyFile !== undefined) {
    key = readSettingFile(keyFile, 'client-key', 'a readable PEM private key');
    try {
      createPrivateKey(key);
    } catch (err) {
      throw invalid(`--client-key: "${keyFile}" holds no usable private key (${(err as Error).message}); expected a PEM private key`);
    }
    try {
      if (cert !== undefined && !new X509Certificate(cert).checkPrivateKey(createPrivateKey(key))) throw new Error('mismatch');
    } catch {
      throw invalid(`--client-key: "${keyFile}" is not the key of --client-cert "${certFile}"; expected the key the certificate was made for`);
    }
  }
  return { caFile, ca, certFile, cert, keyFile, key, serverName };
}

/** Layers (later wins) -> a validated AgentConfig, or a ConfigError naming the bad value. */
export function resolveConfig(...layers: RawConfig[]): AgentConfig {
  const raw: Record<string, string> = {};
  for (const s of settings) if (s.default !== undefined) raw[s.key] = s.default;
  for (const layer of layers) for (const [k, v] of Object.entries(layer)) if (v !== undefined) raw[k] = v;
  const get = (key: string): string => raw[key] ?? '';
  const opt = (key: string): string | undefined => (raw[key] === undefined || raw[key] === '' ? undefined : raw[key]);

  const ssl = bool(get('consulSsl'), 'consul-ssl');
  const given = get('consul');
  const hasScheme = given.includes('://');
  let consul: URL;
  try {
    consul = new URL(hasScheme ? given : `${ssl ? 'https' : 'http'}://${given}`);
    if (consul.protocol !== 'http:' && consul.protocol !== 'https:') throw new Error();
  } catch {
    throw invalid(`--consul: expected a URL such as http://127.0.0.1:8500, got ${JSON.stringify(given)}`);
  }
  if (ssl && consul.protocol === 'http:') {
    throw invalid(`--consul-ssl (CONSUL_HTTP_SSL) is true but --consul "${given}" says http://; expected an https:// address or one without a scheme`);
  }
  const tls = consulTls(opt, consul, given);

  // The token and its file are one choice: the latest layer that sets either decides; within one
  // layer the file wins, as in Consul's CLI (and a file can be rotated).
  let token: string | undefined;
  let tokenFile: string | undefined;
  for (const layer of layers) {
    const file = layer.tokenFile === '' ? undefined : layer.tokenFile;
    const value = layer.token === '' ? undefined : layer.token;
    if (file !== undefined) [token, tokenFile] = [undefined, file];
    else if (value !== undefined) [token, tokenFile] = [value, undefined];
  }
  if (tokenFile !== undefined) {
    token = readSettingFile(tokenFile, 'token-file', 'a readable file holding a Consul ACL token').trim();
    if (token === '') throw invalid(`--token-file: "${tokenFile}" is empty; expected a file holding a Consul ACL token`);
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

  const lbPolicy = get('lbPolicy') as BalancePolicy;
  if (!balancePolicies.includes(lbPolicy)) throw invalid(`--lb-policy: expected one of ${balancePolicies.join(', ')}, got "${get('lbPolicy')}"`);
  const backendDrain = get('backendDrain') as DrainPolicy;
  if (!drainPolicies.includes(backendDrain)) throw invalid(`--backend-drain: expected one of ${drainPolicies.join(', ')}, got "${get('backendDrain')}"`);

  const kvPrefix = get('kvPrefix').replace(/^\/+|\/+$/g, '');
  if (!/^[A-Za-z0-9._/-]+$/.test(kvPrefix)) throw invalid(`--kv-prefix: expected a Consul KV path such as "loopmesh", got "${get('kvPrefix')}"`);

  const hostsFile = get('hostsFile');
  if (hostsFile === '') throw invalid('--hosts-file: expected a file path or "off", got ""');

  const admin = endpoint(get('admin'), 'admin');
  const adminPublic = bool(get('adminPublic'), 'admin-public');
  if (admin && !adminPublic && !isLoopbackHost(admin.host)) {
    throw invalid(`--admin: "${get('admin')}" is not a loopback address, so anyone who reaches this node could read its routes and metrics; expected 127.0.0.1:PORT, or add --admin-public (LOOPMESH_ADMIN_PUBLIC=true) to bind it there on purpose`);
  }

  return {
    consul: consul.origin,
    consulTls: tls,
    token,
    tokenFile,
    datacenter: opt('datacenter'),
    runDir: get('runDir'),
    templates: opt('templates'),
    hostsFile: hostsFile === 'off' ? undefined : hostsFile,
    dns: endpoint(get('dns'), 'dns'),
    admin,
    adminPublic,
    suffix,
    range,
    logLevel,
    services: (opt('services') ?? '').split(',').map((s) => s.trim()).filter(Boolean),
    servicesKv: servicesKv(opt('servicesKv'), opt('services')),
    maxWatches: maxWatches(get('maxWatches')),
    tag: opt('tag'),
    allowWarning: bool(get('allowWarning'), 'allow-warning'),
    renderOnly: bool(get('renderOnly'), 'render-only'),
    empty,
    kvPrefix,
    drainTimeoutMs: seconds(get('drainTimeout'), 'drain-timeout'),
    handoverTimeoutMs: handoverTimeout(get('handoverTimeout')),
    connectTimeoutMs: Math.max(1, seconds(get('connectTimeout'), 'connect-timeout')),
    idleTimeoutMs: Math.max(1, seconds(get('idleTimeout'), 'idle-timeout')),
    consulWaitMs: consulWait(get('consulWait')),
    lbPolicy,
    maxConnections: count(get('maxConnections'), 'max-connections'),
    queue: count(get('queue'), 'queue'),
    queueTimeoutMs: Math.max(1, seconds(get('queueTimeout'), 'queue-timeout')),
    backendDrain,
    workers: workers(get('workers')),
    gatewayService: gatewayService(get('gatewayService')),
    gatewayRange: gatewayRange(opt('gatewayRange')),
    gatewayId: gatewayId(opt('gatewayId')),
    gatewayCheck: gatewayCheck(opt('gatewayCheck')),
  };
}
