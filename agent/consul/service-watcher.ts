import type { Logger } from '../log.js';
import { debounce, type Debounced } from '../debounce.js';
import { BlockingQuery } from './blocking-query.js';
import { ConsulContact, staleProblem } from './contact.js';
import type { ConsulClient } from './client.js';
import { parseHealthService, type Catalog, type CatalogProblem, type HealthFilter, type HealthServiceAnswer, type Instance } from './catalog.js';
import type { ConsulStatus } from './catalog-watcher.js';

/** Consul's default limit of HTTP connections per client address (limits.http_max_conns_per_client). */
export const consulConnectionsPerClient = 200;
/** The long polls a node holds besides its per-service ones (catalog, checks, addresses, traffic, a list) and room for plain reads. */
export const otherConnections = 20;
/** The highest --max-watches: one long poll holds one connection to the local Consul agent. */
export const maxWatchesCeiling = consulConnectionsPerClient - otherConnections;

export interface ServiceWatcherOptions {
  client: Pick<ConsulClient, 'url' | 'healthService'>;
  logger: Logger;
  filter: HealthFilter;
  onCatalog: (catalog: Catalog) => void;
  onProblems?: (problems: CatalogProblem[]) => void;
  waitMs?: number;
  minIntervalMs?: number;
}

/**
 * The explicit-list mode (SmartStack's: a node routes only the services it names): one long poll per
 * named service on /v1/health/service/NAME, which Consul wakes only when that service's own index
 * moves (its instances, their checks, their nodes). So every change of a named service, an address,
 * port, meta or weight change included, arrives at once and costs one answer of that service, and
 * nothing else in the catalog costs this node anything. The number of polls is bounded by
 * --max-watches (each holds one connection to the local Consul agent); a longer list is watched the
 * catalog-wide way (CatalogWatcher).
 *
 * A named service with no registration at all is left out, as CatalogWatcher leaves out a service
 * Consul does not list. A failed or wrong-shaped answer keeps the service's last good instances and
 * marks it stale until its poll succeeds again.
 */
export class ServiceWatcher {
  private readonly watches = new Map<string, BlockingQuery>();
  private readonly answers = new Map<string, HealthServiceAnswer>();
  private readonly staleServices = new Map<string, CatalogProblem>();
  private readonly emitSoon: Debounced;
  private started = false;
  private readonly consul: ConsulContact;
  private readonly statusValue: ConsulStatus;
  private resolveReady!: () => void;
  /** Resolves once every named service answered (or failed) once and the catalog was handed on. */
  readonly ready = new Promise<void>((resolve) => (this.resolveReady = resolve));
  /** Services whose first answer (or failure) is still to come: until then nothing is emitted. */
  private readonly waiting = new Set<string>();

  constructor(private readonly options: ServiceWatcherOptions) {
    this.consul = new ConsulContact(options.logger, options.client.url);
    this.statusValue = this.consul.status;
    this.statusValue.serviceReads = 0;
    // Several polls answering together (a node's check, shared by its services) make one catalog.
    this.emitSoon = debounce(() => this.emit(), 5, 50);
  }

  /** The names watched now: a poll starts for each new one and stops for each one gone. */
  setServices(names: readonly string[]): void {
    const wanted = new Set(names);
    for (const [name, watch] of this.watches) {
      if (wanted.has(name)) continue;
      void watch.stop();
      this.watches.delete(name);
      this.answers.delete(name);
      this.staleServices.delete(name);
      this.waiting.delete(name);
    }
    for (const name of wanted) {
      if (this.watches.has(name)) continue;
      const watch = this.watchOne(name);
      this.watches.set(name, watch);
      this.waiting.add(name);
      if (this.started) watch.start();
    }
    this.emitSoon();
  }

  services(): string[] {
    return [...this.watches.keys()];
  }

  start(): void {
    this.started = true;
    for (const watch of this.watches.values()) watch.start();
    if (this.watches.size === 0) this.emitSoon();
  }

  async stop(): Promise<void> {
    this.started = false;
    this.emitSoon.cancel();
    await Promise.all([...this.watches.values()].map((w) => w.stop()));
  }

  status(): ConsulStatus {
    return this.consul.snapshot();
  }

  stale(): ReadonlyMap<string, CatalogProblem> {
    return new Map(this.staleServices);
  }

  currentProblems(): CatalogProblem[] {
    return [...[...this.answers.values()].flatMap((a) => a.problems), ...this.staleServices.values()];
  }

  private watchOne(name: string): BlockingQuery {
    const { client, logger } = this.options;
    const waitMs = this.options.waitMs ?? 60_000;
    return new BlockingQuery({
      name: `health/service/${name}`,
      logger,
      minIntervalMs: this.options.minIntervalMs ?? 50,
      fetch: (index, signal) => client.healthService(name, { index, waitMs, signal }),
      onChange: (result) => {
        this.contact();
        this.statusValue.serviceReads = (this.statusValue.serviceReads ?? 0) + 1;
        let answer: HealthServiceAnswer;
        try {
          answer = parseHealthService(name, result.body, this.options.filter);
        } catch (err) {
          // Rejected: the poll keeps the last good answer and asks again with backoff.
          this.markStale(name, err);
          throw err;
        }
        if (!this.watches.has(name)) return;
        this.answers.set(name, answer);
        this.waiting.delete(name);
        if (this.staleServices.delete(name)) logger.info({ service: name }, `service ${JSON.stringify(name)} read from Consul again; no longer stale`);
        this.emitSoon();
      },
      onError: (err) => {
        if (!this.watches.has(name)) return;
        this.failed(err);
        this.markStale(name, err);
        this.waiting.delete(name);
        this.emitSoon();
      },
      onRecover: () => this.contact(),
    });
  }

  private contact(): void {
    this.consul.recovered();
  }

  private failed(err: unknown): void {
    this.consul.failed(err);
  }

  private markStale(service: string, err: unknown): void {
    const problem = staleProblem(service, err, this.answers.get(service)?.instances.length);
    if (!this.staleServices.has(service)) this.options.logger.warn({ code: problem.code, service }, problem.message);
    this.staleServices.set(service, problem);
  }

  private emit(): void {
    // The first catalog waits for every named service: one published before the others answered
    // would drop them for a moment after a restart.
    if (!this.started || this.waiting.size > 0) return;
    const catalog = new Map<string, readonly Instance[]>();
    for (const name of [...this.watches.keys()].sort()) {
      const answer = this.answers.get(name);
      // No registration at all: not in Consul's catalog, so not routed (as a name Consul does not list).
      if (answer && answer.registered.length > 0) catalog.set(name, answer.instances);
    }
    this.options.onProblems?.(this.currentProblems());
    this.options.onCatalog(catalog);
    this.resolveReady();
  }
}
