import { setMaxListeners } from 'node:events';
import type { Logger } from '../log.js';
import { isRecord } from '../validate.js';
import { debounce, type Debounced } from '../debounce.js';
import { ConsulError, codes, errorCode, errorMessage } from '../errors.js';
import { BlockingQuery, backoffDelay, retryBaseMs, retryMaxMs } from './blocking-query.js';
import { ConsulContact, staleProblem } from './contact.js';
import type { ConsulClient } from './client.js';
import {
  changedRegistrationFilters,
  parseCatalogServices,
  parseHealthService,
  parseHealthState,
  selectServices,
  servicesAffectedByChecks,
  type Catalog,
  type CatalogProblem,
  type CheckState,
  type HealthFilter,
  type HealthServiceAnswer,
  type Instance,
  type Registration,
  type ServiceSelection,
} from './catalog.js';

/** How long a list change waits for the check list to explain it before every service is read. */
const sweepDelayMs = 100;
/** The same with the filtered check list (a large catalog), which shows no registration: a short pause that lets a burst of changes land. */
const filteredSweepDelayMs = 20;
/**
 * After a list change its names or tags explained, how long until a change hidden in the same answer
 * is looked for (see verifyExplained): one look per burst of changes, off the served path.
 */
const verifyDelayMs = 1000;
/** Above this many known registrations an unexplained change is a sweep, not a probe. */
const maxProbedRegistrations = 1000;
/** A node sweep reads each node once: worth it only while there are far fewer nodes than services. */
const maxSweptNodes = 1000;
/** The filtered check list: what Consul sends when the catalog is large (see pickCheckList). */
const notPassing = 'Status != "passing"';
/** Matches no registration (Consul gives every service an ID): a node's change signal carries no services. */
const noService = 'ID == ""';

function withoutPassing(states: ReadonlyMap<string, CheckState>): Map<string, CheckState> {
  return new Map([...states].filter(([, c]) => c.status !== 'passing'));
}

function sameTags(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((t, i) => t === b[i]);
}

export interface ConsulStatus {
  connected: boolean;
  /** Epoch ms of the last successful read. */
  lastContactAt: number | undefined;
  lastError: { code: string; message: string; at: number } | undefined;
  /** Failed calls since start, by error code. */
  errors: Record<string, number>;
  /** The X-Consul-Index of the service list last read (loopmesh_consul_catalog_index). */
  catalogIndex?: number;
  /** Reads of one service's instances (/v1/health/service/NAME) since start: what changes cost. */
  serviceReads?: number;
  /** Changes no list or check explained, found by reading every selected service (see CatalogWatcher). */
  sweeps?: number;
  /** Filtered service-list queries that looked for registrations other than the known ones. */
  probes?: number;
  /** Node reads (/v1/catalog/node/NAME) that looked for registrations modified since their service's last read. */
  nodeReads?: number;
  /** Per-node change signals held (long polls on /v1/catalog/node/NAME that carry no services; see syncNodeSignals). */
  nodeSignals?: number;
  /** Which check list is watched: every check, or (a large catalog) only those not passing. */
  checkList?: 'all' | 'not-passing';
  /** How the catalog is watched: one long poll per listed service, or catalog-wide (see SelectedWatcher). */
  watchMode?: 'per-service' | 'catalog' | 'waiting';
}

/** The reads the watcher makes: a ConsulClient. */
export type CatalogReader = Pick<ConsulClient, 'url' | 'catalogServices' | 'healthState' | 'healthService'> & Partial<Pick<ConsulClient, 'catalogServicesFiltered' | 'catalogNode'>>;

export interface CatalogWatcherOptions {
  client: CatalogReader;
  logger: Logger;
  selection: ServiceSelection;
  filter: HealthFilter;
  onCatalog: (catalog: Catalog) => void;
  onProblems?: (problems: CatalogProblem[]) => void;
  waitMs?: number;
  minIntervalMs?: number;
  /** Most health reads in flight at once for the services a change named. */
  concurrency?: number;
  /** Most reads in flight at once for a sweep (every selected service), beside the targeted ones. */
  sweepConcurrency?: number;
  /**
   * On a large catalog, up to this many nodes get a change signal each (one long poll, see
   * syncNodeSignals), so a node sweep reads only the nodes that changed. 0 (the default): none.
   */
  maxNodeSignals?: number;
}

/**
 * The one watcher per node. It holds two long polls whatever the number of services (the catalog's
 * service list, and every check's state), and on a change reads only the services it can affect,
 * with a bounded number of plain reads. So the load on the local Consul agent stays flat.
 *
 * A service whose read fails or comes back wrong-shaped keeps its last good instances and is marked
 * stale (see stale()) until a read of it succeeds; only its own reads are retried with backoff, so
 * every other service keeps changing as Consul says.
 */
export class CatalogWatcher {
  private readonly services: BlockingQuery;
  private checks: BlockingQuery;
  /** The check list watched now: every check, or only those not passing (see pickCheckList). */
  private checksFilteredQuery = false;
  /** Whether the check states held (checkStates) came from the filtered list. */
  private checksFiltered = false;
  private readonly queryCommon: { logger: Logger; minIntervalMs: number; onError: (err: unknown) => void; onRecover: () => void };
  private readonly refresh: Debounced;
  private readonly stopped = new AbortController();
  private known = new Map<string, string[]>();
  private checkStates = new Map<string, CheckState>();
  private readonly instances = new Map<string, readonly Instance[]>();
  /** Service -> every node with an instance of it, healthy or not, from its last read. */
  private readonly nodes = new Map<string, readonly string[]>();
  private readonly dirty = new Set<string>();
  /** Instances skipped in each service's last good read. */
  private readonly problems = new Map<string, CatalogProblem[]>();
  /** Services served from an older read because their last read failed: retried until one succeeds. */
  private readonly staleServices = new Map<string, CatalogProblem>();
  private retryTimer: NodeJS.Timeout | undefined;
  /** The newest service-list index no read has explained yet (see servicesChanged). */
  private unexplained: bigint | undefined;
  /** Service -> the X-Consul-Index of its last good read (Consul keeps an index per service). */
  private readonly serviceIndex = new Map<string, bigint>();
  private sweepTimer: NodeJS.Timeout | undefined;
  /** A probe or node sweep is out (see scheduleSweep). */
  private probing = false;
  /** A sweep under way (it runs beside the targeted reads), and whether another was asked for meanwhile. */
  private sweeping: Promise<void> | undefined;
  private sweepAgain = false;
  private checksSeen = false;
  /** Service -> when its last read started (performance.now()). */
  private readonly readStartedAt = new Map<string, number>();
  /** The unexplained index a probe already ran for. */
  private probed: bigint | undefined;
  /** Service -> every registration of it (healthy or not) from its last good read: what a probe compares with. */
  private readonly registered = new Map<string, readonly Registration[]>();
  private catalogSeen = false;
  /** A look for changes hidden behind explained ones is due (see verifyExplained). */
  private verifyTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> | undefined;
  private retryAttempt = 0;
  /** Service -> its instances as last emitted (JSON): a read that changed nothing emits nothing. */
  private readonly emittedFingerprints = new Map<string, string>();
  /** Something in the catalog changed since the last emit (a service's instances, or the set of services). */
  private changedSinceEmit = true;
  private readonly consul: ConsulContact;
  /** What the watcher counts besides contact (reads, sweeps...): the same object as consul.status. */
  private readonly statusValue: ConsulStatus;
  /** Node -> its change signal (see syncNodeSignals). */
  private readonly nodeSignals = new Map<string, BlockingQuery>();
  /** Nodes whose signal has answered and not failed since: a change there will show. */
  private readonly armedNodes = new Set<string>();
  /** Nodes whose signal fired since a node sweep last read them. */
  private readonly changedNodes = new Set<string>();
  private resolveReady!: () => void;
  /** Resolves once the first full catalog has been read and handed to onCatalog. */
  readonly ready = new Promise<void>((resolve) => (this.resolveReady = resolve));

  constructor(private readonly options: CatalogWatcherOptions) {
    const { client, logger } = options;
    // Every read in flight listens on this signal (up to 24 targeted, 16 sweeping and 8 node reads
    // at once): more than Node's default of 10, which would print a leak warning outside the log.
    setMaxListeners(64, this.stopped.signal);
    this.consul = new ConsulContact(logger, client.url);
    this.statusValue = this.consul.status;
    const common = { logger, minIntervalMs: options.minIntervalMs ?? 50, onError: (err: unknown) => this.failed(err), onRecover: () => this.recovered() };
    const waitMs = options.waitMs ?? 60_000;
    this.services = new BlockingQuery({
      ...common,
      name: 'catalog/services',
      fetch: (index, signal) => client.catalogServices({ index, waitMs, signal }),
      onChange: (result) => this.servicesChanged(result.body, result.index),
    });
    this.queryCommon = common;
    this.checks = this.checkList(false);
    // A deregistration touches the service list and the checks within milliseconds: one read for both.
    this.refresh = debounce(() => void this.flush(), 5, 150);
  }

  start(): void {
    this.services.start();
    this.checks.start();
  }

  async stop(): Promise<void> {
    this.stopped.abort();
    this.refresh.cancel();
    clearTimeout(this.retryTimer);
    clearTimeout(this.sweepTimer);
    clearTimeout(this.verifyTimer);
    await Promise.all([this.services.stop(), this.checks.stop(), ...[...this.nodeSignals.values()].map((q) => q.stop())]);
    await this.flushing;
    await this.sweeping;
  }

  status(): ConsulStatus {
    return this.consul.snapshot();
  }

  /** Services routed from an older read (or left out, if they never had a good one), with why: LM_ERR_CONSUL_STALE. */
  stale(): ReadonlyMap<string, CatalogProblem> {
    return new Map([...this.staleServices].filter(([name]) => this.known.has(name)));
  }

  /** Everything wrong with the data from Consul now: skipped instances, then stale services. */
  currentProblems(): CatalogProblem[] {
    const skipped = [...this.problems.entries()].filter(([name]) => this.known.has(name)).flatMap(([, p]) => p);
    return [...skipped, ...this.stale().values()];
  }

  private failed(err: unknown): void {
    this.consul.failed(err);
  }

  private recovered(): void {
    this.consul.recovered();
  }

  /**
   * Throws on a wrong-shaped answer: the BlockingQuery keeps the last good one and asks again.
   *
   * What changed costs what changed: a new service, or one whose tags changed, is read; a removed one
   * is dropped; a health change comes through the check list (checksChanged). A change the list and
   * the checks cannot show (an instance re-registered with a new address, port, meta or weight and
   * the same tags and checks, or an instance without a check) moves only the list's index: it is
   * explained once a service read returns an index at least as new. If none does, a probe asks
   * Consul which services have a registration (node, ID, address, port) other than the known ones
   * (/v1/catalog/services with a filter, a few requests whatever the catalog size), and those are
   * read. Only when that finds nothing either (a meta or weight change, an instance without a check
   * removed) is every selected service read (a sweep), and only those whose index moved taken again.
   */
  private servicesChanged(body: unknown, index: bigint | undefined): void {
    this.recovered();
    let all: Map<string, string[]>;
    try {
      all = parseCatalogServices(body);
    } catch (err) {
      throw new ConsulError(codes.consulInvalidData, errorMessage(err), { cause: err });
    }
    if (index !== undefined) this.statusValue.catalogIndex = Number(index);
    const previous = this.known;
    this.known = new Map(selectServices(all, this.options.selection).map((name) => [name, all.get(name) ?? []]));
    let explained = previous.size !== this.known.size && this.catalogSeen;
    for (const [name, tags] of this.known) {
      const before = previous.get(name);
      if (before !== undefined && sameTags(before, tags)) continue;
      this.dirty.add(name);
      explained = true;
    }
    for (const name of previous.keys()) if (!this.known.has(name)) explained = true;
    if (!explained && this.catalogSeen && index !== undefined && (this.unexplained === undefined || index > this.unexplained)) this.unexplained = index;
    if (explained && this.catalogSeen) this.scheduleVerify();
    for (const map of [this.instances, this.nodes, this.problems, this.staleServices, this.serviceIndex, this.registered, this.readStartedAt, this.emittedFingerprints]) {
      for (const name of [...map.keys()]) {
        if (this.known.has(name)) continue;
        map.delete(name);
        this.changedSinceEmit = true;
      }
    }
    this.catalogSeen = true;
    this.refresh();
  }

  /** The long poll on the check list: every check, or (filtered) only the checks not passing. */
  private checkList(filtered: boolean): BlockingQuery {
    const waitMs = this.options.waitMs ?? 60_000;
    return new BlockingQuery({
      ...this.queryCommon,
      name: filtered ? 'health/state/any?filter=not-passing' : 'health/state/any',
      fetch: (index, signal) => this.options.client.healthState({ index, waitMs, signal, ...(filtered ? { filter: notPassing } : {}) }),
      onChange: (result) => this.checksChanged(result.body, filtered),
    });
  }

  /**
   * Consul builds the whole check list for every answer: at 10,000 checks that is 4 MB and about
   * 150 ms of its time per health change, on every node. Only the checks not passing make a small
   * list (8 ms), and it still shows every health flip; what it cannot show (an instance registered
   * or removed with a passing check) moves the service list's index and is found by the node sweep.
   * So the filtered list is watched when the catalog is large (more registrations than a probe
   * handles) and the node sweep applies (services outnumber nodes); the whole list otherwise, where
   * it is cheap and shows new instances at once.
   */
  private pickCheckList(): void {
    if (this.stopped.signal.aborted) return;
    const registrations = [...this.registered.values()].reduce((n, list) => n + list.length, 0);
    const filtered = registrations > maxProbedRegistrations && this.sweptNodes() !== undefined;
    if (filtered === this.checksFilteredQuery) return;
    this.checksFilteredQuery = filtered;
    this.statusValue.checkList = filtered ? 'not-passing' : 'all';
    this.options.logger.info({ registrations, checkList: this.statusValue.checkList }, filtered ? 'large catalog: watching only the checks that are not passing' : 'watching every check');
    const old = this.checks;
    this.checks = this.checkList(filtered);
    void old.stop();
    this.checks.start();
  }

  /**
   * A change the lists cannot explain (an address, port, meta or weight change) makes a node sweep,
   * and reading every node costs Consul the encoding of the whole catalog (about 6 MB and 100-200 ms
   * at 2,000 x 5). A blocking query on one node's registrations returns only when that node's
   * registrations change; with a filter that matches nothing it carries no services. So each node
   * holding a known instance gets such a signal while there are at most --max-watches of them (each
   * is a connection to the local agent), whatever the catalog's size: a node sweep reads only the
   * nodes whose signal fired since it last read them (see nodeSweep), and the look for a change
   * hidden behind an explained one reads them too (a meta or weight change, which the probe cannot
   * see, is found there).
   */
  private syncNodeSignals(): void {
    if (this.stopped.signal.aborted) return;
    const byNode = this.knownByNode();
    const wanted = byNode !== undefined && byNode.size <= (this.options.maxNodeSignals ?? 0) ? byNode : new Map<string, unknown>();
    for (const [node, query] of this.nodeSignals) {
      if (wanted.has(node)) continue;
      this.nodeSignals.delete(node);
      this.armedNodes.delete(node);
      this.changedNodes.delete(node);
      void query.stop();
    }
    const read = this.options.client.catalogNode?.bind(this.options.client);
    if (!read) return;
    const waitMs = this.options.waitMs ?? 60_000;
    for (const node of wanted.keys()) {
      if (this.nodeSignals.has(node)) continue;
      const query = new BlockingQuery({
        ...this.queryCommon,
        name: `catalog/node/${node}?filter=none`,
        fetch: (index, signal) => read(node, { index, waitMs, signal, filter: noService }),
        // Every answer whose index moved (the first included: what changed before it is not known).
        onChange: () => {
          this.armedNodes.add(node);
          this.changedNodes.add(node);
        },
        // While it fails, a change there may go unseen: the node is read by every node sweep.
        onError: (err) => {
          this.armedNodes.delete(node);
          this.queryCommon.onError(err);
        },
      });
      this.nodeSignals.set(node, query);
      query.start();
    }
    this.statusValue.nodeSignals = this.nodeSignals.size;
  }

  /** Throws on a wrong-shaped answer: the BlockingQuery keeps the last good one and asks again. */
  private checksChanged(body: unknown, filtered: boolean): void {
    this.recovered();
    let next: Map<string, CheckState>;
    try {
      next = parseHealthState(body);
    } catch (err) {
      throw new ConsulError(codes.consulInvalidData, errorMessage(err), { cause: err });
    }
    const nodesOf = (service: string): readonly string[] => this.nodes.get(service) ?? [];
    // The first answer has nothing to compare with: only services whose read started before it
    // arrived may be older than it. The others (the first full read, usually on its way) are newer.
    const first = !this.checksSeen;
    this.checksSeen = true;
    const arrived = performance.now();
    // After a switch between the whole list and the filtered one, only the checks not passing compare.
    const switched = !first && filtered !== this.checksFiltered;
    const affected = first
      ? new Set([...this.known.keys()].filter((name) => (this.readStartedAt.get(name) ?? Infinity) < arrived))
      : switched
        ? servicesAffectedByChecks(withoutPassing(this.checkStates), withoutPassing(next), nodesOf, [...this.known.keys()])
        : servicesAffectedByChecks(this.checkStates, next, nodesOf, [...this.known.keys()]);
    this.checkStates = next;
    this.checksFiltered = filtered;
    for (const name of affected) if (this.known.has(name)) this.dirty.add(name);
    if (this.dirty.size > 0 || this.unexplained !== undefined) this.refresh();
  }

  private flush(): Promise<void> {
    if (this.flushing) {
      // A flush is running: run again once it ends, so no change is missed.
      void this.flushing.then(() => this.refresh());
      return this.flushing;
    }
    this.flushing = this.readDirty().finally(() => (this.flushing = undefined));
    return this.flushing;
  }

  /** The services a change named: read now, ahead of any sweep (which runs beside, see sweep()). */
  private async readDirty(): Promise<void> {
    const batch = [...this.dirty];
    this.dirty.clear();
    const { newest, failures } = await this.readServices(batch, { sweep: false, concurrency: this.options.concurrency ?? (batch.length > 100 ? 24 : 8) });
    if (this.stopped.signal.aborted) return;
    if (this.unexplained !== undefined && newest >= this.unexplained) this.unexplained = undefined;
    this.emit();
    if (this.unexplained !== undefined) this.scheduleSweep();
    this.afterReads(failures);
    this.pickCheckList();
    this.syncNodeSignals();
  }

  /**
   * Reads each service once (up to `concurrency` at a time) and takes each answer that is not older
   * than what it holds (a sweep's read may land after a newer targeted one). Returns the newest
   * service index seen, and how many reads failed.
   */
  private async readServices(names: readonly string[], options: { sweep: boolean; concurrency: number }): Promise<{ newest: bigint; failures: number }> {
    const { sweep } = options;
    let newest = 0n;
    let failures = 0;
    const queue = [...names];
    const worker = async (): Promise<void> => {
      for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
        if (this.stopped.signal.aborted) return;
        let answer: HealthServiceAnswer;
        let index: bigint | undefined;
        try {
          this.readStartedAt.set(name, performance.now());
          const result = await this.options.client.healthService(name, { signal: this.stopped.signal });
          this.statusValue.serviceReads = (this.statusValue.serviceReads ?? 0) + 1;
          // Any answer means Consul is back: the long polls may block for a minute with nothing new,
          // and health must not stay "degraded" that long after one failed read.
          this.recovered();
          index = result.index;
          if (index !== undefined && index > newest) newest = index;
          const held = this.serviceIndex.get(name);
          // A sweep reads every service: one whose index did not move is unchanged, nothing to redo.
          if (sweep && index !== undefined && held === index && this.instances.has(name) && !this.staleServices.has(name)) continue;
          // Older than what a read that landed first brought (Consul's per-service index only grows).
          if (index !== undefined && held !== undefined && index < held && !this.staleServices.has(name)) continue;
          answer = parseHealthService(name, result.body, this.options.filter);
        } catch (err) {
          if (this.stopped.signal.aborted) return;
          // Keep what we had for this service (fail static) and read it again after a pause.
          this.failed(err);
          if (!this.known.has(name)) continue;
          failures += 1;
          this.markStale(name, err);
          continue;
        }
        if (!this.known.has(name)) continue;
        if (index !== undefined) this.serviceIndex.set(name, index);
        this.registered.set(name, answer.registered);
        this.instances.set(name, answer.instances);
        const fingerprint = JSON.stringify(answer.instances);
        if (this.emittedFingerprints.get(name) !== fingerprint) {
          this.emittedFingerprints.set(name, fingerprint);
          this.changedSinceEmit = true;
        }
        this.nodes.set(name, answer.nodes);
        this.problems.set(name, answer.problems);
        if (this.staleServices.delete(name)) this.options.logger.info({ service: name }, `service ${JSON.stringify(name)} read from Consul again; no longer stale`);
      }
    };
    await Promise.all(Array.from({ length: Math.min(options.concurrency, names.length) }, worker));
    return { newest, failures };
  }

  /** After reads: the stale services' own retry, with backoff, while every other service goes on changing. */
  private afterReads(failures: number): void {
    if (this.staleServices.size === 0) {
      this.retryAttempt = 0;
      clearTimeout(this.retryTimer);
      this.retryTimer = undefined;
    } else if (failures > 0 && this.retryTimer === undefined) {
      // Only the stale services wait for the retry; reads for other changes go on meanwhile.
      this.retryAttempt += 1;
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        if (this.stopped.signal.aborted) return;
        for (const name of this.staleServices.keys()) if (this.known.has(name)) this.dirty.add(name);
        this.refresh();
      }, backoffDelay(this.retryAttempt, retryBaseMs, retryMaxMs, Math.random));
    }
  }

  /**
   * A list change nothing explained yet: the check list may still bring it (its long poll returns on
   * its own), so wait a moment; then read every selected service once.
   */
  private scheduleSweep(): void {
    // While a probe or node sweep is out, its findings are still to be read: a second one (or a sweep) now would be early.
    if (this.sweepTimer !== undefined || this.probing) return;
    this.sweepTimer = setTimeout(() => {
      this.sweepTimer = undefined;
      const target = this.unexplained;
      if (this.stopped.signal.aborted || target === undefined) return;
      // One probe per unexplained index: if reading what it found did not explain it, sweep.
      // A node signal that fired since may still explain it (signals and lists answer independently).
      if (this.probed === target && this.changedNodes.size === 0) return this.sweep();
      this.probed = target;
      this.probing = true;
      void this.probe().then(async (probed) => probed.length > 0 ? probed : (await this.nodeSweep()) ?? []).finally(() => (this.probing = false)).then(
        (found) => {
          if (this.stopped.signal.aborted) return;
          if (found.length === 0) return this.sweep();
          for (const name of found) this.dirty.add(name);
          this.refresh();
        },
        (err: unknown) => {
          this.options.logger.debug({ code: errorCode(err) }, `probe for changed registrations failed: ${errorMessage(err)}; reading every service`);
          this.sweep();
        },
      );
      // The filtered check list cannot explain a registration: waiting for it only delays the node sweep.
    }, this.checksFilteredQuery ? filteredSweepDelayMs : sweepDelayMs);
  }

  /**
   * A list answer whose names or tags changed is taken as explained by them, but a change the lists
   * cannot show (an address move) may have landed in the same answer, even in the same transaction.
   * So a moment later, once per burst, look for it the narrow way: the probe (up to 1,000
   * registrations), then the nodes whose change signal fired since they were last read. What either
   * finds is read; finding nothing is the common case and costs nothing more (never a sweep). With
   * more nodes than --max-watches (no signals) such a change waits for the next change nothing
   * explains (up to 1,000 registrations, only a meta or weight change: the probe sees the rest).
   */
  private scheduleVerify(): void {
    if (this.verifyTimer !== undefined || this.stopped.signal.aborted) return;
    this.verifyTimer = setTimeout(() => {
      this.verifyTimer = undefined;
      if (this.stopped.signal.aborted) return;
      // An unexplained change under way looks at least as far.
      if (this.probing || this.sweepTimer !== undefined || this.sweeping) return this.scheduleVerify();
      this.probing = true;
      void this.verifyExplained().finally(() => {
        this.probing = false;
        // A change nothing explained that came meanwhile was not scheduled (a probe was out): now.
        if (this.unexplained !== undefined && !this.stopped.signal.aborted) this.scheduleSweep();
      }).then(
        (found) => {
          if (this.stopped.signal.aborted || found.length === 0) return;
          this.options.logger.debug({ found: found.slice(0, 20) }, 'a change hidden behind an explained one');
          for (const name of found) this.dirty.add(name);
          this.refresh();
        },
        (err: unknown) => this.options.logger.debug({ code: errorCode(err) }, `looking for changes hidden behind explained ones failed: ${errorMessage(err)}; the next change looks again`),
      );
    }, verifyDelayMs);
  }

  private async verifyExplained(): Promise<string[]> {
    const found = new Set(await this.probe());
    // Then the signalled nodes, also when the probe found something (a meta or weight change beside
    // it is only there). Without a signal per node nothing narrow is left to look at: up to 1,000
    // registrations a hidden meta or weight change then waits for the next change nothing explains.
    const read = this.options.client.catalogNode?.bind(this.options.client);
    const byNode = this.knownByNode();
    if (!read || !byNode || this.nodeSignals.size === 0) return [...found];
    const nodes = [...byNode.keys()].filter((node) => this.changedNodes.has(node) || (this.nodeSignals.has(node) && !this.armedNodes.has(node)));
    for (const node of nodes) this.changedNodes.delete(node);
    await this.readNodes(read, nodes, byNode, found);
    return [...found];
  }

  /** The known services with a registration Consul holds and this watcher does not know. */
  private async probe(): Promise<string[]> {
    const filtered = this.options.client.catalogServicesFiltered?.bind(this.options.client);
    // Consul evaluates a filter against every registration, once per query: past a thousand known
    // registrations the queries (about 200 each) cost the servers more than reading every service.
    const registrations = [...this.registered.values()].reduce((n, list) => n + list.length, 0);
    if (!filtered || registrations > maxProbedRegistrations) return [];
    const found = new Set<string>();
    for (const filter of changedRegistrationFilters(this.registered)) {
      this.statusValue.probes = (this.statusValue.probes ?? 0) + 1;
      const result = await filtered(filter, { signal: this.stopped.signal });
      for (const name of parseCatalogServices(result.body).keys()) if (this.known.has(name)) found.add(name);
    }
    return [...found];
  }

  /**
   * Reads each node with an instance of a known service once (/v1/catalog/node/NAME: every service on
   * it with its ModifyIndex) and returns the services with a registration modified after their last
   * read, or one known there and gone: a meta, weight, address or port change, an instance without a
   * check removed. A few requests when services outnumber nodes (2,000 services on 5 nodes: 5 reads
   * instead of 2,000). Undefined when it does not apply (more nodes than half the services); an
   * instance on a node no service had before is not seen, so finding nothing leads to a full sweep.
   */
  private async nodeSweep(): Promise<string[] | undefined> {
    const read = this.options.client.catalogNode?.bind(this.options.client);
    const byNode = this.sweptNodes();
    if (!read || !byNode) return undefined;
    const found = new Set<string>();
    // With signals (syncNodeSignals): first the nodes whose signal fired or that have none working.
    const first = [...byNode.keys()].filter((node) => this.changedNodes.has(node) || !this.armedNodes.has(node));
    for (const node of first) this.changedNodes.delete(node);
    await this.readNodes(read, first, byNode, found);
    // Found nothing: a signal may still be on its way (it and the service list answer independently).
    // Read the other nodes too, rather than reading every service.
    if (found.size === 0 && first.length < byNode.size) {
      const read1 = new Set(first);
      await this.readNodes(read, [...byNode.keys()].filter((node) => !read1.has(node)), byNode, found);
    }
    this.options.logger.debug({ nodes: byNode.size, signalled: first.length, found: [...found].slice(0, 20) }, 'node sweep');
    return [...found];
  }

  /** Reads the given nodes (8 at a time) and adds to `found` the services changed there (see nodeSweep). */
  private async readNodes(read: NonNullable<CatalogReader['catalogNode']>, nodes: readonly string[], byNode: ReadonlyMap<string, ReadonlyArray<{ service: string; id: string }>>, found: Set<string>): Promise<void> {
    const queue = [...nodes];
    const worker = async (): Promise<void> => {
      for (let node = queue.shift(); node !== undefined; node = queue.shift()) {
        if (this.stopped.signal.aborted) return;
        this.statusValue.nodeReads = (this.statusValue.nodeReads ?? 0) + 1;
        const result = await read(node, { signal: this.stopped.signal });
        const services = isRecord(result.body) && isRecord(result.body.Services) ? result.body.Services : {};
        const present = new Set<string>();
        for (const entry of Object.values(services)) {
          // Read for a hint only: whatever is found is read and validated through health/service.
          if (!isRecord(entry) || typeof entry.Service !== 'string' || typeof entry.ID !== 'string') continue;
          present.add(`${entry.Service}\u0000${entry.ID}`);
          if (!this.known.has(entry.Service)) continue;
          const held = this.serviceIndex.get(entry.Service);
          const modified = typeof entry.ModifyIndex === 'number' && Number.isSafeInteger(entry.ModifyIndex) ? BigInt(entry.ModifyIndex) : undefined;
          if (held === undefined || modified === undefined || modified > held) found.add(entry.Service);
        }
        // Known on this node and gone (an instance removed with no check to show it).
        for (const { service, id } of byNode.get(node) ?? []) if (!present.has(`${service}\u0000${id}`)) found.add(service);
      }
    };
    await Promise.all(Array.from({ length: Math.min(8, queue.length) }, worker));
  }

  /** Node -> the known instances on it, when a node sweep applies (services outnumber nodes); else undefined. */
  private sweptNodes(): Map<string, Array<{ service: string; id: string }>> | undefined {
    const byNode = this.knownByNode();
    if (byNode === undefined || byNode.size === 0 || byNode.size > maxSweptNodes || byNode.size > this.known.size / 2) return undefined;
    return byNode;
  }

  /** Node -> the known instances on it (undefined when the client cannot read a node). */
  private knownByNode(): Map<string, Array<{ service: string; id: string }>> | undefined {
    if (!this.options.client.catalogNode) return undefined;
    const byNode = new Map<string, Array<{ service: string; id: string }>>();
    for (const [service, list] of this.registered) {
      if (!this.known.has(service)) continue;
      for (const r of list) {
        const on = byNode.get(r.node) ?? [];
        on.push({ service, id: r.id });
        byNode.set(r.node, on);
      }
    }
    return byNode;
  }

  /**
   * Reads every selected service once, beside the targeted reads (which go on, and are not held up
   * behind it: a new service or a health flip is live while a sweep of thousands is under way).
   * A second unexplained change during a sweep runs another sweep after it.
   */
  private sweep(): void {
    if (this.stopped.signal.aborted || this.unexplained === undefined) return;
    if (this.sweeping) {
      this.sweepAgain = true;
      return;
    }
    const target = this.unexplained;
    this.statusValue.sweeps = (this.statusValue.sweeps ?? 0) + 1;
    this.options.logger.debug({ index: target.toString(), services: this.known.size }, 'a change no list explained: reading every service (a sweep)');
    this.sweeping = (async () => {
      const { failures } = await this.readServices([...this.known.keys()], { sweep: true, concurrency: this.options.sweepConcurrency ?? 16 });
      if (this.stopped.signal.aborted) return;
      // Every service was read after the change at `target`: it is explained, whatever it was.
      if (this.unexplained !== undefined && this.unexplained <= target) this.unexplained = undefined;
      this.emit();
      this.afterReads(failures);
      this.pickCheckList();
      this.syncNodeSignals();
    })().finally(() => {
      this.sweeping = undefined;
      if (this.sweepAgain) {
        this.sweepAgain = false;
        if (this.unexplained !== undefined) this.scheduleSweep();
      }
    });
  }

  private markStale(service: string, err: unknown): void {
    const problem = staleProblem(service, err, this.instances.get(service)?.length);
    if (!this.staleServices.has(service)) this.options.logger.warn({ code: problem.code, service }, problem.message);
    this.staleServices.set(service, problem);
  }

  private emit(): void {
    if (!this.catalogSeen) return;
    const catalog = new Map<string, readonly Instance[]>();
    for (const name of this.known.keys()) {
      const instances = this.instances.get(name);
      // A service never read successfully is left out rather than published with no backends.
      if (instances) catalog.set(name, instances);
    }
    this.options.onProblems?.(this.currentProblems());
    // Compared per service as each read lands (a whole-catalog fingerprint cost ~20 ms per change at 2,000 services).
    if (this.changedSinceEmit) {
      this.changedSinceEmit = false;
      this.options.onCatalog(catalog);
    }
    if (this.dirty.size === 0 && this.stale().size === 0) this.resolveReady();
  }
}
