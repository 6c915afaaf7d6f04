import type { Logger } from '../log.js';
import { errorCode, errorMessage } from '../errors.js';
import { sleep } from '../sleep.js';
import type { QueryResult } from './client.js';

export interface BlockingQueryOptions {
  name: string;
  fetch: (index: bigint | undefined, signal: AbortSignal) => Promise<QueryResult>;
  /**
   * Called with the first answer and with every answer whose index moved. Throwing rejects the
   * answer (a wrong shape): it counts as a failed call, so it is retried with backoff from a plain read.
   */
  onChange: (result: QueryResult) => void;
  /** Called on every failed call (the loop goes on by itself). */
  onError?: (err: unknown, attempt: number, retryInMs: number) => void;
  /** Called on the first success after failures. */
  onRecover?: () => void;
  logger: Logger;
  /** Shortest time between two calls, so a flapping index cannot turn the loop into a busy loop. */
  minIntervalMs?: number;
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  random?: () => number;
}

/** Next index to send, per Consul's blocking-query rules. */
export function nextIndex(previous: bigint | undefined, received: bigint | undefined): { index: bigint | undefined; changed: boolean } {
  if (received === undefined) return { index: undefined, changed: true };
  // Never block on index 0: it would return at once, forever.
  const index = received < 1n ? 1n : received;
  if (previous === undefined) return { index, changed: true };
  // Same index: nothing new, ask again. Lower index (a snapshot restore, a new leader): reset to it.
  return { index, changed: index !== previous };
}

/**
 * Retry pacing after a failed call to Consul. The cap is short because the peer is the node's own
 * Consul agent: polling it every few seconds costs nothing, and a long cap is what decides how long
 * routes stay stale after a Consul restart.
 */
export const retryBaseMs = 250;
export const retryMaxMs = 10_000;

/** Exponential backoff with full jitter, capped; attempt starts at 1. */
export function backoffDelay(attempt: number, baseMs: number, maxMs: number, random: () => number): number {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt - 1, 30));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/** One long-poll loop that never gives up: the shape of consul-template's watch/view.go. */
export class BlockingQuery {
  private readonly controller = new AbortController();
  private loop: Promise<void> | undefined;

  constructor(private readonly options: BlockingQueryOptions) {}

  start(): void {
    this.loop ??= this.run();
  }

  async stop(): Promise<void> {
    this.controller.abort();
    await this.loop;
  }

  private async run(): Promise<void> {
    const { name, logger } = this.options;
    const minInterval = this.options.minIntervalMs ?? 50;
    const base = this.options.backoffBaseMs ?? retryBaseMs;
    const max = this.options.backoffMaxMs ?? retryMaxMs;
    const random = this.options.random ?? Math.random;
    const signal = this.controller.signal;
    let index: bigint | undefined;
    /** The index of the last result handed to onChange: what this node serves now. */
    let accepted: bigint | undefined;
    /** Failed or rejected calls in a row: paces the retries. */
    let attempt = 0;
    let unreachable = false;
    /** The last rejected answer's reason, so a lasting one is logged once, not on every retry. */
    let rejection: string | undefined;
    const retryLater = async (err: unknown, rejected: boolean): Promise<void> => {
      attempt += 1;
      // After a failure the cluster may have restarted with lower indexes, and blocking on the index
      // of a rejected answer would keep it in force until the next change: the next call is a plain read.
      index = undefined;
      const delay = backoffDelay(attempt, base, max, random);
      const fields = { query: name, code: errorCode(err), attempt, retryInMs: delay };
      if (rejected && rejection !== errorMessage(err)) logger.warn(fields, `answer rejected, the last accepted one stays in force: ${errorMessage(err)}`);
      else logger.debug(fields, errorMessage(err));
      rejection = rejected ? errorMessage(err) : undefined;
      this.options.onError?.(err, attempt, delay);
      await sleep(delay, signal);
    };
    while (!signal.aborted) {
      const started = Date.now();
      let result: QueryResult;
      try {
        result = await this.options.fetch(index, signal);
      } catch (err) {
        if (signal.aborted) return;
        unreachable = true;
        await retryLater(err, false);
        continue;
      }
      if (unreachable) {
        unreachable = false;
        this.options.onRecover?.();
      }
      if (!result.knownLeader && accepted !== undefined && result.index !== undefined && result.index < accepted) {
        // A stale read from a server that knows no leader and is behind what this node serves: a
        // server replaying its log after a restart answers from an old snapshot. Keep what we have
        // and ask again shortly (a cluster really rebuilt with lower indexes elects a leader first).
        logger.debug({ query: name, accepted: accepted.toString(), returned: result.index.toString() }, 'older answer from a Consul server without a leader ignored');
        index = undefined;
        await sleep(base, signal);
        continue;
      }
      const next = nextIndex(index, result.index);
      logger.trace({ query: name, index: index?.toString(), returned: result.index?.toString(), knownLeader: result.knownLeader, tookMs: Date.now() - started }, 'Consul query returned');
      if (index !== undefined && next.index !== undefined && next.index < index) {
        logger.info({ query: name, from: index.toString(), to: next.index.toString() }, 'Consul index went backwards; reset');
      }
      if (next.changed) {
        try {
          this.options.onChange(result);
        } catch (err) {
          await retryLater(err, true);
          continue;
        }
        accepted = next.index;
      }
      attempt = 0;
      rejection = undefined;
      index = next.index;
      const elapsed = Date.now() - started;
      const pause = Math.max(0, minInterval - elapsed) + Math.round(random() * minInterval * 0.2);
      if (pause > 0) await sleep(pause, signal);
    }
  }
}
