import type { Logger } from '../log.js';
import { ConsulError, codes, errorCode, errorMessage, type Problem } from '../errors.js';
import { describe, isRecord } from '../validate.js';
import { BlockingQuery } from './blocking-query.js';
import type { Catalog, CatalogProblem, HealthFilter } from './catalog.js';
import { CatalogWatcher, type CatalogReader, type ConsulStatus } from './catalog-watcher.js';
import type { ConsulClient } from './client.js';
import { ServiceWatcher } from './service-watcher.js';

/** What the agent needs from whatever watches the catalog for it. */
export interface CatalogSource {
  readonly ready: Promise<void>;
  start(): void;
  stop(): Promise<void>;
  status(): ConsulStatus;
  stale(): ReadonlyMap<string, CatalogProblem>;
  currentProblems(): Problem[];
}

/** A Consul service name, as Consul accepts one in a DNS-safe setup (the plan checks labels again). */
const serviceName = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$/;

/**
 * The value of the --services-kv key: a JSON array of names, or names separated by commas or new
 * lines (a `#` starts a comment line). An entry that is not a service name is dropped with a problem
 * naming it; the others are routed. Throws (the last good list stays) when the value is neither.
 */
export function parseServicesList(key: string, value: string): { services: string[]; problems: Problem[] } {
  const problems: Problem[] = [];
  let entries: unknown[];
  const text = value.trim();
  if (text.startsWith('[')) {
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (err) {
      throw new ConsulError(codes.consulInvalidData, `Consul KV ${key}: ${errorMessage(err)}; expected a JSON array of service names like ["web","db"], or names separated by commas or new lines`);
    }
    if (!Array.isArray(json)) throw new ConsulError(codes.consulInvalidData, `Consul KV ${key}: expected a JSON array of service names, got ${describe(json)}`);
    entries = json;
  } else {
    entries = text.split('\n').filter((line) => !line.trim().startsWith('#')).flatMap((line) => line.split(',')).map((s) => s.trim()).filter(Boolean);
  }
  const services = new Set<string>();
  for (const entry of entries) {
    if (typeof entry === 'string' && serviceName.test(entry)) services.add(entry);
    else problems.push({ code: codes.consulInvalidData, message: `Consul KV ${key}: entry ${describe(entry)} is not a service name (letters, digits, "-", "_", ".", at most 255); skipped, the others are routed` });
  }
  return { services: [...services].sort(), problems };
}

export interface SelectedWatcherOptions {
  client: CatalogReader & Pick<ConsulClient, 'healthService' | 'kvGet'>;
  logger: Logger;
  /** Static names (--services); empty with a KV list. */
  services: readonly string[];
  /** --services-kv: the key holding the list. */
  servicesKv: string | undefined;
  /** Always watched besides the list (the gateway service). */
  always: readonly string[];
  tag: string | undefined;
  maxWatches: number;
  filter: HealthFilter;
  waitMs: number;
  onCatalog: (catalog: Catalog) => void;
  onProblems: (problems: Problem[]) => void;
}

/**
 * Picks how the catalog is watched, and follows a KV list of services:
 * - a list (--services, or --services-kv) of at most --max-watches services, and no --tag: one long
 *   poll per service (ServiceWatcher): exact, and a change costs only the service that changed;
 * - all services, a tag, or a longer list: the catalog-wide watch (CatalogWatcher, two long polls).
 * A KV list that changes is followed at once (polls added and removed, or the mode switched).
 */
export class SelectedWatcher implements CatalogSource {
  private inner: ServiceWatcher | CatalogWatcher | undefined;
  private listQuery: BlockingQuery | undefined;
  private listProblems: Problem[] = [];
  private innerProblems: CatalogProblem[] = [];
  private started = false;
  private resolveReady!: () => void;
  readonly ready = new Promise<void>((resolve) => (this.resolveReady = resolve));
  private lastList: string | undefined;
  /** The last failed read of the --services-kv key, until one succeeds. */
  private listError: { code: string; message: string; at: number } | undefined;

  constructor(private readonly options: SelectedWatcherOptions) {
    const { servicesKv } = options;
    if (servicesKv !== undefined) {
      this.listQuery = new BlockingQuery({
        name: `kv/${servicesKv}`,
        logger: options.logger,
        minIntervalMs: 250,
        fetch: (index, signal) => options.client.kvGet(servicesKv, { index, waitMs: options.waitMs, signal }),
        onChange: (result) => {
          this.listError = undefined;
          this.listChanged(result.body);
        },
        // A key this token may not read (403), or Consul down: said in status and problems, retried;
        // the last good list (if any) stays in force.
        onError: (err) => {
          if (this.listError?.message !== errorMessage(err)) options.logger.warn({ code: errorCode(err), key: servicesKv }, `cannot read the list of services to route from Consul KV ${servicesKv}: ${errorMessage(err)}`);
          this.listError = { code: errorCode(err), message: `cannot read the list of services to route from Consul KV ${servicesKv}: ${errorMessage(err)}`, at: Date.now() };
          this.publishProblems();
        },
      });
    } else {
      this.use(options.services);
    }
  }

  /** How the catalog is watched now: 'per-service' or 'catalog'. */
  mode(): 'per-service' | 'catalog' | 'waiting' {
    return this.inner instanceof ServiceWatcher ? 'per-service' : this.inner ? 'catalog' : 'waiting';
  }

  start(): void {
    this.started = true;
    this.inner?.start();
    this.listQuery?.start();
  }

  async stop(): Promise<void> {
    this.started = false;
    await Promise.all([this.listQuery?.stop(), this.inner?.stop()]);
  }

  status(): ConsulStatus {
    const status = this.inner?.status() ?? { connected: false, lastContactAt: undefined, lastError: this.listError, errors: this.listError ? { [this.listError.code]: 1 } : {} };
    return { ...status, watchMode: this.mode() };
  }

  stale(): ReadonlyMap<string, CatalogProblem> {
    return this.inner?.stale() ?? new Map();
  }

  currentProblems(): Problem[] {
    return [...this.listProblems, ...(this.listError ? [{ code: this.listError.code, message: this.listError.message }] : []), ...(this.inner?.currentProblems() ?? [])];
  }

  private listChanged(body: unknown): void {
    const key = this.options.servicesKv ?? '';
    const value = isRecord(body) ? body.Value : undefined;
    let listed: string[];
    if (body === undefined || body === null || value === null || value === undefined) {
      listed = [];
      this.listProblems = [{ code: codes.servicesKvMissing, message: `Consul KV ${key} does not exist or is empty: no service is routed; put a list there, e.g. consul kv put ${key} '["web","db"]'` }];
    } else if (typeof value !== 'string') {
      throw new ConsulError(codes.consulInvalidData, `Consul KV ${key}: expected a string value, got ${describe(value)}`);
    } else {
      const parsed = parseServicesList(key, value);
      listed = parsed.services;
      this.listProblems = parsed.problems;
    }
    for (const p of this.listProblems) this.options.logger.warn({ code: p.code }, p.message);
    const fingerprint = JSON.stringify(listed);
    if (fingerprint === this.lastList) return this.publishProblems();
    this.lastList = fingerprint;
    this.options.logger.info({ key, services: listed.length }, 'services to route read from Consul KV');
    this.use(listed);
  }

  private publishProblems(): void {
    this.options.onProblems([...this.listProblems, ...(this.listError ? [{ code: this.listError.code, message: this.listError.message }] : []), ...this.innerProblems]);
  }

  /** Watches `listed` (plus the always-watched services) the way its size calls for. */
  private use(listed: readonly string[]): void {
    const { options } = this;
    const names = [...new Set([...listed, ...options.always])];
    const explicit = options.servicesKv !== undefined || options.services.length > 0;
    const perService = explicit && options.tag === undefined && names.length <= options.maxWatches;
    const onCatalog = (catalog: Catalog): void => {
      options.onCatalog(catalog);
      this.resolveReady();
    };
    const onProblems = (problems: CatalogProblem[]): void => {
      this.innerProblems = problems;
      this.publishProblems();
    };
    if (perService && this.inner instanceof ServiceWatcher) {
      this.inner.setServices(names);
      return;
    }
    const previous = this.inner;
    if (perService) {
      const watcher = new ServiceWatcher({ client: options.client, logger: options.logger, filter: options.filter, waitMs: options.waitMs, onCatalog, onProblems });
      watcher.setServices(names);
      this.inner = watcher;
    } else {
      if (explicit && options.tag === undefined) {
        options.logger.info({ services: names.length, maxWatches: options.maxWatches }, `${names.length} services listed, more than --max-watches ${options.maxWatches}: watched catalog-wide`);
      }
      this.inner = new CatalogWatcher({
        client: options.client,
        logger: options.logger,
        selection: { services: explicit ? listed : [], tag: options.tag, always: options.always },
        filter: options.filter,
        waitMs: options.waitMs,
        // The same budget of long polls as the per-service mode: a signal per node on a large catalog.
        maxNodeSignals: options.maxWatches,
        onCatalog,
        onProblems,
      });
    }
    // The old watcher stops once the new one runs; its last catalog stays in force until the new one's first.
    void previous?.stop().catch((err: unknown) => options.logger.debug({ code: errorCode(err) }, errorMessage(err)));
    if (this.started) this.inner.start();
  }
}
