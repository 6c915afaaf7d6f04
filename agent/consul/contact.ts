import type { Logger } from '../log.js';
import { codes, errorCode, errorMessage } from '../errors.js';
import type { CatalogProblem } from './catalog.js';
import type { ConsulStatus } from './catalog-watcher.js';

/**
 * Whether Consul answers, as a watcher sees it: errors by code, the last one, the last contact; an
 * outage is said once (also before Consul ever answered), and the end of it once.
 */
export class ConsulContact {
  readonly status: ConsulStatus = { connected: false, lastContactAt: undefined, lastError: undefined, errors: {} };
  private warned = false;

  constructor(
    private readonly logger: Logger,
    private readonly url: string,
  ) {}

  failed(err: unknown): void {
    const code = errorCode(err);
    this.status.errors[code] = (this.status.errors[code] ?? 0) + 1;
    this.status.lastError = { code, message: errorMessage(err), at: Date.now() };
    // Consul answered, with something unusable (logged where it is rejected): reachable, not an outage.
    if (code === codes.consulInvalidData) return;
    if (this.status.connected || !this.warned) {
      this.warned = true;
      this.logger.warn({ code, consul: this.url }, `Consul unavailable, serving the last-known-good routes: ${errorMessage(err)}`);
    }
    this.status.connected = false;
  }

  recovered(): void {
    if (!this.status.connected) this.logger.info({ consul: this.url }, 'Consul reachable again');
    this.status.connected = true;
    this.status.lastContactAt = Date.now();
  }

  snapshot(): ConsulStatus {
    return { ...this.status, errors: { ...this.status.errors } };
  }
}

/** LM_ERR_CONSUL_STALE for a service whose read failed; `kept`: the healthy instances still served. */
export function staleProblem(service: string, err: unknown, kept: number | undefined): CatalogProblem {
  const serving = kept !== undefined ? `its last good read (${kept} healthy instance${kept === 1 ? '' : 's'}) stays in service` : 'it is not routed until a good read';
  const why = errorCode(err) === codes.consulInvalidData ? `Consul's answer had the wrong shape: ${errorMessage(err)}` : `reading it from Consul failed (${errorCode(err)}): ${errorMessage(err)}`;
  return { service, code: codes.consulStale, message: `service ${JSON.stringify(service)} is stale: ${why}; ${serving}, retrying` };
}
