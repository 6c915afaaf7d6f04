import { realpath } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Balancer } from '../balancer/balancer.js';
import type { BalancerConfig, DrainPolicy } from '../contract/balancer-config.js';
import { BalancerFileSource, type RenderedBalancer } from '../balancer/file-source.js';
import type { Endpoint } from '../config/config.js';
import { DnsServer } from '../dns/server.js';
import { checkHostsLines, writeHostsBlock } from '../dns/hosts-file.js';
import { DataPlaneError, codes, errorCode, errorMessage, type Problem } from '../errors.js';
import { handOver, type HandOverOptions, type InheritedSockets, type ListeningSocket } from '../hot-restart/handover.js';
import { readRunDirFileIfExists } from '../fs/run-dir.js';
import type { Logger } from '../log.js';
import type { AddressRange } from '../plan/addresses.js';
import { Retry } from '../retry.js';
import { balancerFile, hostsFile as renderedHostsFile } from '../contract/files.js';

export interface DataPlaneOptions {
  runDir: string;
  logger: Logger;
  suffix: string;
  dns: Endpoint | undefined;
  hostsFile: string | undefined;
  connectTimeoutMs: number;
  /** Default 1 hour (the balancer's). */
  idleTimeoutMs?: number;
  drainTimeoutMs: number;
  /** Per-service limit defaults (flags); a service's KV traffic document overrides them. */
  maxConnections?: number;
  queue?: number;
  queueTimeoutMs?: number;
  backendDrain?: DrainPolicy;
  /** A gateway: services listen inside this range, reachable from other nodes (loopback otherwise). */
  gatewayRange?: AddressRange;
  /** From a predecessor process (hot restart): its sockets, and its config, served before the file. */
  inherited?: InheritedSockets;
}

/** What an in-process renderer hands the data plane (see DataPlane.reload). */
export interface RenderedFiles {
  balancer?: RenderedBalancer;
  /** The rendered hosts file's text. */
  hosts?: string;
}

/** Name -> its gateway addresses in the served config: the only non-loopback addresses a hosts line may hold. */
function gatewaysByName(config: BalancerConfig | undefined): Map<string, Set<string>> {
  const out = new Map<string, Set<string>>();
  for (const s of config?.services ?? []) {
    if (!s.gateways?.length) continue;
    out.set(s.fqdn.toLowerCase(), new Set(s.gateways.map((g) => g.address)));
  }
  return out;
}

/** Dropped hosts lines shown one by one in hostsProblems(); the rest are counted. */
const maxHostsLineProblems = 20;

/**
 * Balancer, DNS responder and hosts block, driven only by the rendered files in the run dir, so it
 * serves the last-known-good routes whatever the control plane is doing.
 */
export class DataPlane {
  readonly balancer: Balancer;
  readonly dns: DnsServer | undefined;
  private readonly source: BalancerFileSource;
  /** While a handover runs: resolves true once the successor serves (then this process only drains). */
  private handover: Promise<boolean> | undefined;
  /** The config applied last (the inherited one, or the file's). */
  private served: BalancerConfig | undefined;
  /** Lines of the rendered hosts file that were dropped, and the last failed hosts-file write. */
  private hostsLineProblems: Problem[] = [];
  private hostsWriteProblem: Problem | undefined;
  /** A failed hosts update is tried again: in split mode nothing else would. */
  private readonly hostsRetry = new Retry(() => void this.syncHosts());
  /** Dropped lines already logged: each distinct line once while it stays, not on every reload. */
  private readonly loggedHostsLines = new Set<string>();

  constructor(private readonly options: DataPlaneOptions) {
    const { logger } = options;
    const { inherited } = options;
    this.balancer = new Balancer({
      logger: logger.child({ stage: 'balancer' }),
      connectTimeoutMs: options.connectTimeoutMs,
      idleTimeoutMs: options.idleTimeoutMs,
      drainTimeoutMs: options.drainTimeoutMs,
      maxConnections: options.maxConnections,
      queue: options.queue,
      queueTimeoutMs: options.queueTimeoutMs,
      backendDrain: options.backendDrain,
      inherited,
    });
    this.dns = options.dns
      ? new DnsServer({ host: options.dns.host, port: options.dns.port, suffix: options.suffix, logger: logger.child({ stage: 'dns' }), inherited })
      : undefined;
    this.source = new BalancerFileSource({
      path: join(options.runDir, balancerFile),
      logger: logger.child({ stage: 'balancer' }),
      onConfig: (config) => this.apply(config),
      gatewayRange: options.gatewayRange,
    });
  }

  async start(): Promise<void> {
    await this.dns?.start();
    const inherited = this.options.inherited;
    // A successor serves what its predecessor served first (the file may hold a config that did not
    // load), on the inherited sockets; then it follows the file like any data plane.
    if (inherited?.config) await this.apply(inherited.config);
    await this.source.start();
    const unused = inherited?.releaseRest() ?? [];
    if (unused.length > 0) this.options.logger.info({ sockets: unused }, 'inherited sockets no service uses any more were closed');
  }

  /** Every listening socket (services and DNS), for a successor process. */
  listeningSockets(): ListeningSocket[] {
    return [...this.balancer.listeningSockets(), ...(this.dns?.listeningSockets() ?? [])];
  }

  /**
   * Hot restart: starts a successor process that takes over every listening socket and the current
   * config, and resolves with its pid once it serves. Config changes wait meanwhile, so the set of
   * sockets handed over stays the set in use. On failure this process carries on as before.
   */
  async handOver(options: Pick<HandOverOptions, 'timeoutMs' | 'command'>): Promise<number> {
    if (this.handover) throw new DataPlaneError(codes.handover, 'a handover is already running or done');
    let settle: (handedOver: boolean) => void = () => undefined;
    this.handover = new Promise<boolean>((resolve) => (settle = resolve));
    try {
      await this.balancer.settled();
      const pid = await handOver({ ...options, sockets: this.listeningSockets(), config: this.config() });
      settle(true);
      return pid;
    } catch (err) {
      this.handover = undefined;
      settle(false);
      throw err;
    }
  }

  /**
   * Reads the rendered files now (a renderer that wrote them calls this). An in-process renderer
   * passes what it rendered instead, before it writes the files: the balancer.json parsed and the
   * hosts lines, so a change is served without waiting for the writes and nothing is read back.
   */
  async reload(rendered?: RenderedFiles): Promise<void> {
    const syncs = this.hostsSyncs;
    if (rendered?.hosts !== undefined) this.renderedHosts = rendered.hosts;
    await this.source.reload(rendered?.balancer);
    // A new config was applied and synced the hosts block already: once per change is enough.
    if (this.hostsSyncs === syncs) await this.syncHosts();
  }

  /** Hosts-block syncs begun (see reload). */
  private hostsSyncs = 0;
  /** The hosts lines the in-process renderer handed in last: used instead of the run dir's file, which may not be written yet. */
  private renderedHosts: string | undefined;

  config(): BalancerConfig | undefined {
    return this.served ?? this.source.current();
  }

  private async apply(config: BalancerConfig): Promise<void> {
    // The successor follows the file from now on; this process keeps what it handed over.
    if (this.handover && (await this.handover)) return;
    const result = await this.balancer.apply(config);
    this.served = config;
    this.dns?.setServices(config.services);
    if (result.added.length + result.removed.length + result.updated.length > 0) {
      this.options.logger.info({ added: result.added, removed: result.removed, updated: result.updated }, 'routes applied');
    }
    await this.syncHosts();
  }

  /** Why the hosts block is not what the rendered file asked for: dropped lines, a refused or failed write. */
  hostsProblems(): Problem[] {
    const shown = this.hostsLineProblems.slice(0, maxHostsLineProblems);
    const more = this.hostsLineProblems.length - shown.length;
    if (more > 0) shown.push({ code: codes.hostsInvalidLine, message: `and ${more} more lines of the rendered hosts file dropped (see the log)` });
    return this.hostsWriteProblem ? [...shown, this.hostsWriteProblem] : shown;
  }

  private async syncHosts(): Promise<void> {
    this.hostsSyncs += 1;
    const target = this.options.hostsFile;
    if (!target) return;
    // After a handover the successor owns the block (its pid on the marker).
    if (this.handover && (await this.handover)) return;
    let rendered = this.renderedHosts;
    try {
      rendered ??= await readRunDirFileIfExists(join(this.options.runDir, renderedHostsFile));
    } catch (err) {
      // A planted or world-writable file, or no file descriptor left: the block keeps what it has.
      this.hostsFailed({ code: codes.hostsWrite, message: `cannot update the hosts file ${target} from the run dir (${errorCode(err)}): ${errorMessage(err)}; the block keeps its lines` }, target);
      return;
    }
    if (rendered === undefined) return;
    // The run dir is untrusted: only loopback addresses under the suffix may reach the hosts file.
    const checked = checkHostsLines(rendered, { suffix: this.options.suffix, gateways: gatewaysByName(this.config()) });
    this.hostsLineProblems = checked.dropped.map((d) => d.problem);
    const current = new Set(checked.dropped.map((d) => d.line));
    for (const line of this.loggedHostsLines) if (!current.has(line)) this.loggedHostsLines.delete(line);
    for (const { line, problem } of checked.dropped) {
      if (this.loggedHostsLines.has(line)) continue;
      this.loggedHostsLines.add(line);
      this.options.logger.warn({ code: problem.code, file: target }, problem.message);
    }
    const owner = await realpath(this.options.runDir).catch(() => resolve(this.options.runDir));
    try {
      if (await writeHostsBlock(target, checked.text, { owner, logger: this.options.logger })) this.options.logger.info({ file: target }, 'hosts block updated');
      this.hostsWriteProblem = undefined;
      this.hostsRetry.succeeded();
    } catch (err) {
      this.hostsFailed({ code: errorCode(err), message: errorMessage(err) }, target);
    }
  }

  /** Logged once while it lasts, and tried again with backoff. */
  private hostsFailed(problem: Problem, target: string): void {
    if (problem.message !== this.hostsWriteProblem?.message) this.options.logger.error({ code: problem.code, file: target }, problem.message);
    this.hostsWriteProblem = problem;
    this.hostsRetry.failed();
  }

  /**
   * Stops serving. With `drain`, listeners stop accepting at once and open connections may finish
   * (up to the drain timeout) before the rest is released: a process stopped by a signal never cuts
   * a connection it can let finish. The hosts block is left in place: addresses are stable, so it
   * stays right for the next process.
   */
  async close(options: { drain?: boolean } = {}): Promise<void> {
    this.hostsRetry.stop();
    await this.source.close();
    await this.dns?.close();
    if (options.drain) await this.balancer.drain();
    await this.balancer.close();
  }
}
