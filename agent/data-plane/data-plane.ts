import { join } from 'node:path';
import { Balancer } from '../balancer/balancer.js';
import type { BalancerConfig } from '../balancer/config.js';
import { BalancerFileSource } from '../balancer/file-source.js';
import type { Endpoint } from '../config/config.js';
import { DnsServer } from '../dns/server.js';
import { writeHostsBlock } from '../dns/hosts-file.js';
import { errorCode, errorMessage } from '../errors.js';
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
}

/**
 * Balancer, DNS responder and hosts block, driven only by the rendered files in the run dir, so it
 * serves the last-known-good routes whatever the control plane is doing.
 */
export class DataPlane {
  readonly balancer: Balancer;
  readonly dns: DnsServer | undefined;
  private readonly source: BalancerFileSource;

  constructor(private readonly options: DataPlaneOptions) {
    const { logger } = options;
    this.balancer = new Balancer({ logger: logger.child({ stage: 'balancer' }), connectTimeoutMs: options.connectTimeoutMs, drainTimeoutMs: options.drainTimeoutMs });
    this.dns = options.dns
      ? new DnsServer({ host: options.dns.host, port: options.dns.port, suffix: options.suffix, logger: logger.child({ stage: 'dns' }) })
      : undefined;
    this.source = new BalancerFileSource({
      path: join(options.runDir, balancerFile),
      logger: logger.child({ stage: 'balancer' }),
      onConfig: (config) => this.apply(config),
    });
  }

  async start(): Promise<void> {
    await this.dns?.start();
    await this.source.start();
  }

  /** Reads the rendered files now (the renderer calls this right after it writes). */
  async reload(): Promise<void> {
    await this.source.reload();
    await this.syncHosts();
  }

  config(): BalancerConfig | undefined {
    return this.source.current();
  }

  private async apply(config: BalancerConfig): Promise<void> {
    const result = await this.balancer.apply(config);
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
