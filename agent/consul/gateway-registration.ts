import { codes, errorCode, errorMessage, type Problem } from '../errors.js';
import type { Logger } from '../log.js';
import type { AddressRange } from '../plan/addresses.js';
import { gatewayRangeMeta, mirroredRangeMeta } from '../plan/gateways.js';
import { Retry } from '../retry.js';
import { intToIPv4 } from '../validate.js';
import type { ConsulClient, ServiceRegistration } from './client.js';

/** How often the registration is made again (idempotent): a Consul agent that lost it gets it back. */
const refreshMs = 30_000;

export interface GatewayRegistrationOptions {
  client: ConsulClient;
  logger: Logger;
  /** The Consul service name (--gateway-service). */
  service: string;
  /** Its ID (--gateway-id); default loopmesh-gateway-BASE. */
  id: string | undefined;
  range: AddressRange;
  /** The loopback range it mirrors (--range): nodes check it is theirs. */
  mirrored: AddressRange;
  /** What Consul's HTTP check asks: the gateway's admin /health/live, or --gateway-check. */
  checkUrl: string;
}

function checkPort(url: string): number {
  const parsed = new URL(url);
  return parsed.port ? Number(parsed.port) : parsed.protocol === 'https:' ? 443 : 80;
}

/** The default service ID of a gateway: one per range, so two gateways on one node do not clash. */
export function defaultGatewayId(range: AddressRange): string {
  return `loopmesh-gateway-${intToIPv4(range.first - 1)}`;
}

/**
 * A gateway in Consul: registered with its local agent (service, meta with its range, an HTTP check
 * every second, so a dead gateway is critical within about two seconds and leaves every node's set),
 * made again every 30 s and after a failure, and taken out on a graceful stop.
 */
export class GatewayRegistration {
  readonly id: string;
  private problem: Problem | undefined;
  private registered = false;
  private stopped = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly retry = new Retry(() => void this.register());

  constructor(private readonly options: GatewayRegistrationOptions) {
    this.id = options.id ?? defaultGatewayId(options.range);
  }

  definition(): ServiceRegistration {
    const { service, range, mirrored, checkUrl } = this.options;
    return {
      name: service,
      id: this.id,
      address: intToIPv4(range.first),
      // Consul's catalog (and loopmesh's parser) wants a port: the one of its check (its admin).
      port: checkPort(checkUrl),
      meta: { [gatewayRangeMeta]: range.cidr, [mirroredRangeMeta]: mirrored.cidr },
      // Registered only once this process serves (see Agent.reconcileOnce), so it starts passing: a
      // registration again (every 30 s, a hot restart's successor) must not reset it to critical.
      check: { name: `loopmesh gateway ${this.id}`, http: checkUrl, interval: '1s', timeout: '1s', deregisterAfter: '10m', status: 'passing' },
    };
  }

  start(): void {
    void this.register();
    this.timer = setInterval(() => void this.register(), refreshMs);
    this.timer.unref();
  }

  problems(): Problem[] {
    return this.problem ? [this.problem] : [];
  }

  private inflight: Promise<void> | undefined;

  private register(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    this.inflight ??= this.registerOnce().finally(() => (this.inflight = undefined));
    return this.inflight;
  }

  private async registerOnce(): Promise<void> {
    try {
      await this.options.client.registerService(this.definition());
      if (!this.registered || this.problem) this.options.logger.info({ id: this.id, range: this.options.range.cidr, check: this.options.checkUrl }, 'gateway registered in Consul');
      this.registered = true;
      this.problem = undefined;
      this.retry.succeeded();
    } catch (err) {
      const message = `cannot register gateway ${this.id} in Consul (${errorCode(err)}): ${errorMessage(err)}; nodes do not use it until it is registered (the token needs service:write on "${this.options.service}")`;
      if (message !== this.problem?.message) this.options.logger.error({ code: codes.gatewayRegister }, message);
      this.problem = { code: codes.gatewayRegister, message };
      this.retry.failed();
    }
  }

  /** With `deregister` false (a hot restart: the successor keeps the same registration), it stays. */
  async stop(options: { deregister: boolean }): Promise<void> {
    this.stopped = true;
    this.retry.stop();
    if (this.timer) clearInterval(this.timer);
    // A registration on its way would otherwise land after the deregistration.
    await this.inflight;
    if (!options.deregister || !this.registered) return;
    try {
      await this.options.client.deregisterService(this.id);
      this.options.logger.info({ id: this.id }, 'gateway deregistered from Consul');
    } catch (err) {
      this.options.logger.warn({ code: errorCode(err) }, `cannot deregister gateway ${this.id}: ${errorMessage(err)}; its check fails and Consul removes it after 10 minutes`);
    }
  }
}
