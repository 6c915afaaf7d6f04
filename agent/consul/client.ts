import { EventEmitter } from 'node:events';
import { readFile, stat } from 'node:fs/promises';
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import Consul from 'consul';
import type { AgentConfig, ConsulTls } from '../config/config.js';
import { ConsulError, codes } from '../errors.js';
import type { Logger } from '../log.js';
import { describe, isRecord } from '../validate.js';

/** What every read returns: the body as Consul sent it (unvalidated) and the blocking-query index. */
export interface QueryResult {
  body: unknown;
  /** X-Consul-Index, or undefined when Consul sent none. */
  index: bigint | undefined;
  knownLeader: boolean;
}

export interface ReadOptions {
  /** Blocking query: return when the index moves past this, or after `waitMs`. */
  index?: bigint;
  waitMs?: number;
  signal?: AbortSignal;
  /** false: read from the leader, for a value a check-and-set is based on (default: any server). */
  stale?: boolean;
}

/** Where each request's ACL token comes from, so a rotated token reaches the next request. */
export interface TokenSource {
  /** The token to send now; undefined sends none. */
  current(): Promise<string | undefined>;
  /** Consul refused the token (403): look for a new one before the next request. */
  rejected(): void;
}

export interface ConsulClientOptions {
  /** http://host:port or https://host:port */
  url: string;
  token?: string | TokenSource;
  /** Datacenter to read; Consul's local one when unset. */
  datacenter?: string;
  /** CA, client certificate and server name for an https:// url; refused with http://. */
  tls?: ConsulTls;
  /** Told of every call that was not canceled, when it ends (the agent's /metrics). */
  onCall?: (call: ConsulCall) => void;
}

/** One call to Consul as ConsulClient.call() saw it. */
export interface ConsulCall {
  /** The call's name without its argument: 'health.service', 'catalog.service.list', 'kv.get'. */
  endpoint: string;
  seconds: number;
  /** A blocking query (a long poll): its time is mostly Consul waiting for a change. */
  blocking: boolean;
  /** The error code (LM_ERR_CONSUL_*) of a failed call; undefined when it succeeded. */
  code: string | undefined;
}

interface HttpResponseLike {
  statusCode?: number;
  headers: Record<string, string | string[] | undefined>;
  body?: unknown;
}

/** The papi request context: an emitter that cancels on 'cancel' and asks for the raw response. */
class RequestContext extends EventEmitter {
  readonly includeResponse = true;
  canceled = false;
  finished = false;
}

type Call = (opts: Record<string, unknown>) => Promise<unknown>;

/** The client the agent and `loopmesh render` build from the validated config. */
export function consulClientOptions(config: Pick<AgentConfig, 'consul' | 'consulTls' | 'token' | 'tokenFile' | 'datacenter'>, logger: Logger): ConsulClientOptions {
  return {
    url: config.consul,
    tls: config.consulTls,
    datacenter: config.datacenter,
    token: config.tokenFile !== undefined ? new TokenFile(config.tokenFile, logger, { initial: config.token }) : config.token,
  };
}

/**
 * A thin, typed shell over the `consul` npm client: every call goes through `read` or `write`, so
 * timeouts, cancellation, token, TLS and error classification live in one place.
 */
/** A service this process registers in its local Consul agent (a gateway), with one HTTP check. */
export interface ServiceRegistration {
  name: string;
  id: string;
  address: string;
  port: number;
  meta: Record<string, string>;
  check: { name: string; http: string; interval: string; timeout: string; deregisterAfter: string; status?: 'passing' | 'critical' };
}

export class ConsulClient {
  private readonly consul: Consul;
  readonly url: string;
  private readonly token: string | TokenSource | undefined;
  private readonly datacenter: string | undefined;
  private readonly tls: ConsulTls | undefined;
  private readonly onCall: ((call: ConsulCall) => void) | undefined;

  constructor(options: ConsulClientOptions) {
    const url = new URL(options.url);
    this.url = url.origin;
    this.token = options.token;
    this.datacenter = options.datacenter;
    this.tls = options.tls;
    this.onCall = options.onCall;
    const secure = url.protocol === 'https:';
    // Never a silent fallback to plain HTTP: TLS settings with an http:// address are a mistake.
    if (options.tls && !secure && (options.tls.ca || options.tls.cert || options.tls.serverName)) {
      throw new ConsulError(codes.consulTls, `TLS settings are given but the Consul address ${this.url} is plain HTTP; expected an https:// address`);
    }
    const tls = options.tls;
    const agent = secure
      ? new HttpsAgent({
          keepAlive: true,
          minVersion: 'TLSv1.2',
          ...(tls?.ca !== undefined ? { ca: tls.ca } : {}),
          ...(tls?.cert !== undefined ? { cert: tls.cert } : {}),
          ...(tls?.key !== undefined ? { key: tls.key } : {}),
          ...(tls?.serverName !== undefined ? { servername: tls.serverName } : {}),
        })
      : new HttpAgent({ keepAlive: true });
    this.consul = new Consul({
      host: url.hostname.replace(/^\[(.*)\]$/, '$1'),
      port: url.port ? Number(url.port) : secure ? 443 : 80,
      secure,
      agent,
    });
  }

  catalogServices(opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read('catalog.service.list', (o) => this.consul.catalog.service.list(o as never), {}, opts);
  }

  /** /v1/catalog/services?filter=EXPR: the services with a registration the expression matches. */
  catalogServicesFiltered(filter: string, opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read('catalog.service.list(filter)', (o) => this.consul.catalog.service.list(o as never), { filter }, opts);
  }

  /**
   * /v1/catalog/node/NODE: the node and every service registered on it, each with its ModifyIndex.
   * With `filter`, only the services it matches; as a blocking query it returns when a registration
   * on this node changes (not on other nodes' changes), so a filter matching nothing makes it a
   * cheap per-node change signal.
   */
  catalogNode(node: string, opts: ReadOptions & { filter?: string } = {}): Promise<QueryResult> {
    const { filter, ...read } = opts;
    return this.read(`catalog.node.services(${node}${filter ? ', filter' : ''})`, (o) => this.consul.catalog.node.services(o as never), filter ? { node, filter } : { node }, read);
  }

  healthService(service: string, opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read(`health.service(${service})`, (o) => this.consul.health.service(o as never), { service }, opts);
  }

  /** /v1/health/state/any, every check; with `filter` (e.g. Status != "passing") only those it matches. */
  healthState(opts: ReadOptions & { filter?: string } = {}): Promise<QueryResult> {
    const { filter, ...read } = opts;
    return this.read(filter ? 'health.state(any, filter)' : 'health.state(any)', (o) => this.consul.health.state(o as never), filter ? { state: 'any', filter } : { state: 'any' }, read);
  }

  kvGet(key: string, opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read(`kv.get(${key})`, (o) => this.consul.kv.get(o as never), { key }, opts);
  }

  /** Every key under `prefix` (?recurse): an array of {Key, Value (decoded from base64), ...}; undefined body on 404 (none). */
  kvList(prefix: string, opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read(`kv.get(${prefix}?recurse)`, (o) => this.consul.kv.get(o as never), { key: prefix, recurse: true }, opts);
  }

  /** Check-and-set: cas 0 creates only if absent. Resolves whether Consul took the write. */
  async kvCas(key: string, value: string, cas: bigint): Promise<boolean> {
    const result = await this.call(`kv.set(${key})`, (o) => this.consul.kv.set(o as never), { key, value, cas: cas.toString() }, {});
    return result.body === true;
  }

  /** The local Consul agent's node name (/v1/agent/self Config.NodeName), validated here. */
  async nodeName(): Promise<string> {
    const result = await this.call('agent.self', (o) => this.consul.agent.self(o as never), {}, {});
    const config = isRecord(result.body) ? result.body.Config : undefined;
    const name = isRecord(config) ? config.NodeName : undefined;
    if (typeof name !== 'string' || name === '') {
      throw new ConsulError(codes.consulInvalidData, `agent/self: expected a non-empty string Config.NodeName, got ${describe(name)}`);
    }
    return name;
  }

  /** PUT /v1/agent/service/register on the local agent: idempotent, the same ID replaces itself. */
  async registerService(service: ServiceRegistration): Promise<void> {
    await this.call(`agent.service.register(${service.id})`, (o) => this.consul.agent.service.register(o as never), {
      name: service.name,
      id: service.id,
      address: service.address,
      port: service.port,
      meta: service.meta,
      check: { name: service.check.name, http: service.check.http, interval: service.check.interval, timeout: service.check.timeout, deregistercriticalserviceafter: service.check.deregisterAfter, ...(service.check.status ? { status: service.check.status } : {}) },
    }, {});
  }

  async deregisterService(id: string): Promise<void> {
    await this.call(`agent.service.deregister(${id})`, (o) => this.consul.agent.service.deregister(o as never), { id }, {});
  }

  async leader(): Promise<string> {
    const result = await this.call('status.leader', (o) => this.consul.status.leader(o as never), {}, {});
    return typeof result.body === 'string' ? result.body : '';
  }

  private read(name: string, fn: Call, params: Record<string, unknown>, opts: ReadOptions): Promise<QueryResult> {
    // Stale reads spread the load over all servers and keep answering while there is no leader.
    const blocking: Record<string, unknown> = opts.stale === false ? {} : { stale: true };
    if (opts.index !== undefined) {
      const waitMs = opts.waitMs ?? 60_000;
      blocking.index = opts.index.toString();
      blocking.wait = `${Math.ceil(waitMs / 1000)}s`;
      // Consul adds up to wait/16 of jitter; leave room for it before calling the request dead.
      blocking.timeout = waitMs + Math.max(waitMs / 8, 5_000);
    }
    return this.call(name, fn, { ...params, ...blocking }, opts);
  }

  private async call(name: string, fn: Call, params: Record<string, unknown>, opts: ReadOptions): Promise<QueryResult> {
    const ctx = new RequestContext();
    const onAbort = (): void => {
      ctx.canceled = true;
      ctx.emit('cancel');
    };
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const request: Record<string, unknown> = { timeout: 10_000, ...params, ctx };
    const token = typeof this.token === 'string' ? this.token : await this.token?.current();
    if (token) request.token = token;
    if (this.datacenter) request.dc = this.datacenter;
    const started = performance.now();
    let code: string | undefined;
    try {
      const out = await fn(request);
      const [res, body] = Array.isArray(out) ? (out as [HttpResponseLike, unknown]) : [undefined, out];
      const header = res?.headers['x-consul-index'];
      const raw = Array.isArray(header) ? header[0] : header;
      let index: bigint | undefined;
      try {
        index = raw === undefined ? undefined : BigInt(raw);
      } catch {
        index = undefined;
      }
      return { body, index, knownLeader: res?.headers['x-consul-knownleader'] !== 'false' };
    } catch (cause) {
      const err = classify(name, this.url, this.tls, cause);
      code = err.code;
      if (httpStatus(err) === 403 && typeof this.token === 'object') this.token.rejected();
      throw err;
    } finally {
      ctx.finished = true;
      opts.signal?.removeEventListener('abort', onAbort);
      if (this.onCall && !ctx.canceled) this.onCall({ endpoint: name.replace(/\(.*$/s, ''), seconds: (performance.now() - started) / 1000, blocking: params.index !== undefined, code });
    }
  }

  close(): void {
    this.consul.destroy();
  }
}

/**
 * A token read from a file and read again when the file changes (checked at most once per interval,
 * and at once after a 403), so a rotated token is used without a restart. A file that cannot be read
 * or is empty keeps the last good token and is reported once (LM_ERR_TOKEN_FILE).
 */
export class TokenFile implements TokenSource {
  private token: string | undefined;
  private stamp: string | undefined;
  private checkedAt = 0;
  private forced = false;
  private checking: Promise<void> | undefined;
  private reported: string | undefined;
  private readonly intervalMs: number;
  private readonly now: () => number;

  constructor(
    readonly path: string,
    private readonly logger: Logger,
    options: { initial?: string | undefined; intervalMs?: number; now?: () => number } = {},
  ) {
    this.token = options.initial;
    this.intervalMs = options.intervalMs ?? 1000;
    this.now = options.now ?? Date.now;
    // The config read the file just now: its first check is one interval away.
    if (options.initial !== undefined) this.checkedAt = this.now();
  }

  async current(): Promise<string | undefined> {
    // A read under way is waited for: a request must not go out with a token older than the file's.
    if (this.checking || this.forced || this.now() - this.checkedAt >= this.intervalMs) {
      this.checking ??= this.check().finally(() => (this.checking = undefined));
      await this.checking;
    }
    return this.token;
  }

  rejected(): void {
    this.forced = true;
  }

  private async check(): Promise<void> {
    const forced = this.forced;
    this.forced = false;
    this.checkedAt = this.now();
    let text: string;
    let stamp: string;
    try {
      const s = await stat(this.path);
      stamp = `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`;
      if (stamp === this.stamp && !forced) return;
      text = (await readFile(this.path, 'utf8')).trim();
    } catch (err) {
      return this.problem(`cannot read the token file "${this.path}" (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    if (text === '') return this.problem(`the token file "${this.path}" is empty`);
    this.stamp = stamp;
    if (this.reported !== undefined) this.logger.info({ file: this.path }, 'the token file is readable again');
    this.reported = undefined;
    if (text !== this.token) {
      if (this.token !== undefined) this.logger.info({ file: this.path }, 'the token file changed; the new token is used from the next request on');
      this.token = text;
    }
  }

  /** Said once per kind of failure, not once per second. */
  private problem(message: string): void {
    if (this.reported === message) return;
    this.reported = message;
    this.logger.warn({ code: codes.tokenFile, file: this.path }, `${message}; keeping the last token read from it`);
  }
}

const untrustedServerCert = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'CERT_SIGNATURE_FAILURE',
  'INVALID_CA',
  'INVALID_PURPOSE',
  'PATH_LENGTH_EXCEEDED',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
]);

/**
 * The cause of a failed TLS handshake with Consul, in words that point at the setting to fix, or
 * undefined when `code` is not a TLS failure. Pure, so every branch is tested without a network.
 */
export function tlsFailure(code: string, message: string, url: string, tls: ConsulTls | undefined): string | undefined {
  // OpenSSL's text is "...:SSL routines:FUNCTION:REASON:file:line..."; the reason is what people read.
  const reason = /SSL routines:[^:]*:([^:]+)/.exec(message)?.[1] ?? message;
  const detail = `(${code}: ${reason.trim()})`;
  if (untrustedServerCert.has(code)) {
    const trusted = tls?.caFile ? `the CA in --ca-file "${tls.caFile}"` : "the system's CAs (no --ca-file / CONSUL_CACERT given)";
    return `the certificate of Consul at ${url} is not signed by ${trusted} ${detail}`;
  }
  if (code === 'CERT_HAS_EXPIRED') return `the certificate of Consul at ${url} has expired ${detail}`;
  if (code === 'CERT_NOT_YET_VALID') return `the certificate of Consul at ${url} is not valid yet ${detail}`;
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID' || code === 'HOSTNAME_MISMATCH') {
    const name = tls?.serverName ? `--tls-server-name "${tls.serverName}"` : `the host of ${url}`;
    return `the certificate of Consul at ${url} does not hold ${name}; set --tls-server-name (CONSUL_TLS_SERVER_NAME) to a name it holds ${detail}`;
  }
  if (!code.startsWith('ERR_SSL_') && code !== 'EPROTO') return undefined;
  if (/WRONG_VERSION_NUMBER|PACKET_LENGTH_TOO_LONG|HTTP_REQUEST|wrong version number|packet length too long/i.test(`${code} ${reason}`)) {
    return `Consul at ${url} does not answer TLS: is that a plain HTTP port? ${detail}`;
  }
  if (/CERTIFICATE_REQUIRED|HANDSHAKE_FAILURE|BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|CERTIFICATE_REVOKED|CERTIFICATE_EXPIRED|UNSUPPORTED_CERTIFICATE|certificate required|handshake failure|bad certificate|unknown ca|certificate unknown/i.test(`${code} ${reason}`)) {
    return tls?.certFile
      ? `Consul at ${url} refused the client certificate --client-cert "${tls.certFile}": is it signed by a CA Consul trusts (its tls ca_file)? ${detail}`
      : `Consul at ${url} asks for a client certificate (verify_incoming) and none is set; set --client-cert and --client-key (CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY) ${detail}`;
  }
  return `the TLS handshake with Consul at ${url} failed ${detail}`;
}

/** The HTTP status of a classified ConsulError, when Consul answered one. */
export function httpStatus(err: unknown): number | undefined {
  const cause = (err as { cause?: { statusCode?: unknown } } | undefined)?.cause;
  return typeof cause?.statusCode === 'number' ? cause.statusCode : undefined;
}

export function isHttpStatus(err: unknown, status: number): boolean {
  return httpStatus(err) === status;
}

/** A cause that keeps what callers match on and drops the request (its headers carry the token). */
function plainCause(message: string, fields: { code?: string; statusCode?: number }): Error {
  return Object.assign(new Error(message), fields);
}

function bodyText(body: unknown): string {
  const text = Buffer.isBuffer(body) ? body.toString('utf8') : typeof body === 'string' ? body : '';
  return text.replace(/\s+/g, ' ').trim().slice(0, 200);
}

function classify(name: string, url: string, tls: ConsulTls | undefined, cause: unknown): ConsulError {
  const err = (isRecord(cause) || cause instanceof Error ? cause : {}) as { statusCode?: number; response?: HttpResponseLike; message?: string; code?: string };
  const message = err.message ?? String(cause);
  const status = err.statusCode ?? err.response?.statusCode;
  if (typeof status === 'number') {
    const body = bodyText(err.response?.body);
    if (status === 400 && /HTTP request to an HTTPS server/i.test(body)) {
      return new ConsulError(codes.consulTls, `Consul at ${url} only answers HTTPS; use an https:// address or --consul-ssl (CONSUL_HTTP_SSL=true), with --ca-file for its CA`, {
        cause: plainCause(body, { statusCode: status }),
      });
    }
    const said = body && !message.includes(body) ? `${message}: ${body}` : message;
    return new ConsulError(codes.consulStatus, `Consul at ${url} answered ${name} with HTTP ${status}: ${said}`.trim(), { cause: plainCause(said, { statusCode: status }) });
  }
  const code = typeof err.code === 'string' ? err.code : '';
  const tlsCause = tlsFailure(code, message.replace(/^consul: (\S+: )?/, ''), url, tls);
  if (tlsCause !== undefined) {
    // Not retried over http, ever: the watcher asks again over TLS, with backoff.
    return new ConsulError(codes.consulTls, `TLS to Consul failed for ${name}: ${tlsCause}`, { cause: plainCause(message, { code }) });
  }
  if (/decode \([^)]*\) failed/.test(message)) {
    // Consul answered, with a body that is not JSON: bad data, not an outage.
    return new ConsulError(codes.consulInvalidData, `Consul at ${url} answered ${name} with a body that is not valid JSON: ${message}`, { cause: plainCause(message, { code }) });
  }
  return new ConsulError(codes.consulUnreachable, `Consul at ${url} is unreachable for ${name}: ${message}`, { cause: plainCause(message, { code }) });
}
