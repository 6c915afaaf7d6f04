import { EventEmitter } from 'node:events';
import Consul from 'consul';
import { ConsulError, codes } from '../errors.js';
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
}

export interface ConsulClientOptions {
  /** http://host:port or https://host:port */
  url: string;
  token?: string;
  /** Datacenter to read; Consul's local one when unset. */
  datacenter?: string;
}

interface HttpResponseLike {
  statusCode?: number;
  headers: Record<string, string | string[] | undefined>;
}

/** The papi request context: an emitter that cancels on 'cancel' and asks for the raw response. */
class RequestContext extends EventEmitter {
  readonly includeResponse = true;
  canceled = false;
  finished = false;
}

type Call = (opts: Record<string, unknown>) => Promise<unknown>;

/**
 * A thin, typed shell over the `consul` npm client: every call goes through `read` or `write`, so
 * timeouts, cancellation, token and error classification live in one place.
 */
export class ConsulClient {
  private readonly consul: Consul;
  readonly url: string;
  private readonly token: string | undefined;
  private readonly datacenter: string | undefined;

  constructor(options: ConsulClientOptions) {
    const url = new URL(options.url);
    this.url = url.origin;
    this.token = options.token;
    this.datacenter = options.datacenter;
    this.consul = new Consul({
      host: url.hostname.replace(/^\[(.*)\]$/, '$1'),
      port: url.port ? Number(url.port) : url.protocol === 'https:' ? 443 : 80,
      secure: url.protocol === 'https:',
    });
  }

  catalogServices(opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read('catalog.service.list', (o) => this.consul.catalog.service.list(o as never), {}, opts);
  }

  healthService(service: string, opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read(`health.service(${service})`, (o) => this.consul.health.service(o as never), { service }, opts);
  }

  healthState(opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read('health.state(any)', (o) => this.consul.health.state(o as never), { state: 'any' }, opts);
  }

  kvGet(key: string, opts: ReadOptions = {}): Promise<QueryResult> {
    return this.read(`kv.get(${key})`, (o) => this.consul.kv.get(o as never), { key }, opts);
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

  async leader(): Promise<string> {
    const result = await this.call('status.leader', (o) => this.consul.status.leader(o as never), {}, {});
    return typeof result.body === 'string' ? result.body : '';
  }

  private read(name: string, fn: Call, params: Record<string, unknown>, opts: ReadOptions): Promise<QueryResult> {
    // Stale reads spread the load over all servers and keep answering while there is no leader.
    const blocking: Record<string, unknown> = { stale: true };
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
    if (this.token) request.token = this.token;
    if (this.datacenter) request.dc = this.datacenter;
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
      throw classify(name, this.url, cause);
    } finally {
      ctx.finished = true;
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  close(): void {
    this.consul.destroy();
  }
}

function classify(name: string, url: string, cause: unknown): ConsulError {
  const err = cause as { statusCode?: number; response?: { statusCode?: number }; message?: string; code?: string };
  const status = err?.statusCode ?? err?.response?.statusCode;
  if (typeof status === 'number') {
    return new ConsulError(codes.consulStatus, `Consul at ${url} answered ${name} with HTTP ${status}: ${err.message ?? ''}`.trim(), {
      cause,
    });
  }
  return new ConsulError(codes.consulUnreachable, `Consul at ${url} is unreachable for ${name}: ${err?.message ?? String(cause)}`, {
    cause,
  });
}

export function isHttpStatus(err: unknown, status: number): boolean {
  const e = err as { cause?: { statusCode?: number; response?: { statusCode?: number } } };
  return (e?.cause?.statusCode ?? e?.cause?.response?.statusCode) === status;
}
