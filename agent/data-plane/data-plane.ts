import { join } from 'node:path';
import { Balancer } from '../balancer/balancer.js';
import type { BalancerConfig } from '../balancer/config.js';
import { BalancerFileSource } from '../balancer/file-source.js';
import type { Endpoint } from '../config/config.js';
import { DnsServer } from '../dns/server.js';
import { writeHostsBlock } from '../dns/hosts-file.js';
import { DataPlaneError, codes, errorCode, errorMessage } from '../errors.js';
import { handOver, type HandOverOptions, type InheritedSockets, type ListeningSocket } from './handover.js';
import { readFileIfExists } from '../fs/atomic-write.js';
import type { Logger } from '../log.js';
import { balancerFile, hostsFile as renderedHostsFile } from '../render/render.js';

export interface DataPlaneOptions {
  runDir: string;
  logger: Logger;
  suffix: string;
  dns: Endpoint | undefined;
  hostsFile: string | undefined;
  connectTimeoutMs: number;
  drainTimeoutMs: number;
  /** From a predecessor process (hot restart): its sockets, and its config, served before the file. */
  inherited?: InheritedSockets;
}

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

  constructor(private readonly options: DataPlaneOptions) {
    const { logger } = options;
    const { inherited } = options;
    this.balancer = new Balancer({ logger: logger.child({ stage: 'balancer' }), connectTimeoutMs: options.connectTimeoutMs, drainTimeoutMs: options.drainTimeoutMs, inherited });
    this.dns = options.dns
      ? new DnsServer({ host: options.dns.host, port: options.dns.port, suffix: options.suffix, logger: logger.child({ stage: 'dns' }), inherited })
      : undefined;
    this.source = new BalancerFileSource({
      path: join(options.runDir, balancerFile),
      logger: logger.child({ stage: 'balancer' }),
      onConfig: (config) => this.apply(config),
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

  /** Reads the rendered files now (the renderer calls this right after it writes). */
  async reload(): Promise<void> {
    await this.source.reload();
    await this.syncHosts();
  }

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

  private async syncHosts(): Promise<void> {
    const target = this.options.hostsFile;
    if (!target) return;
    const lines = await readFileIfExists(join(this.options.runDir, renderedHostsFile));
    if (lines === undefined) return;
    try {
      if (await writeHostsBlock(target, lines, { logger: this.options.logger })) this.options.logger.info({ file: target }, 'hosts block updated');
    } catch (err) {
      this.options.logger.error({ code: errorCode(err), file: target }, errorMessage(err));
    }
  }

  /**
   * Stops serving. With `drain`, listeners stop accepting at once and open connections may finish
   * (up to the drain timeout) before the rest is released: a process stopped by a signal never cuts
   * a connection it can let finish. The hosts block is left in place: addresses are stable, so it
   * stays right for the next process.
   */
  async close(options: { drain?: boolean } = {}): Promise<void> {
    await this.source.close();
    await this.dns?.close();
    if (options.drain) await this.balancer.drain();
    await this.balancer.close();
  }
}
