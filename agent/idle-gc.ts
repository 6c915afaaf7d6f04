import { getHeapStatistics, setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { Logger } from './log.js';
import { errorMessage } from './errors.js';

export interface IdleCollectorOptions {
  /** How long nothing must change before the collection runs. */
  quietMs: number;
  /** Below this many routes the agent's heap is small and left to V8 alone. */
  minRoutes: number;
  logger: Logger;
}

/**
 * One full garbage collection once the agent has been quiet for a while after a change, on a node
 * that routes thousands of services. A first sync or a burst of changes there leaves tens of MB of
 * garbage and grown heap space that V8 keeps until its next major collection, which a quiet agent
 * may not run for a long time: at 2,000 services x 5 instances the agent's RSS at rest was 129-175
 * MB depending only on when the last collection happened. The collection runs on the event loop
 * (tens of ms at that size), only after `quietMs` without a change, and at most once per quiet
 * period; under continuous churn V8 collects as usual.
 */
export class IdleCollector {
  private timer: NodeJS.Timeout | undefined;
  private collect: (() => void) | undefined;
  private disabled = false;

  constructor(private readonly options: IdleCollectorOptions) {}

  /** After each reconcile: (re)starts the quiet period when the node routes at least minRoutes services. */
  touched(routes: number): void {
    if (this.disabled || routes < this.options.minRoutes) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => this.run(), this.options.quietMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private run(): void {
    this.timer = undefined;
    const { logger } = this.options;
    try {
      if (!this.collect) {
        // V8's gc() function, without starting Node with --expose-gc: a context made after the flag
        // is set has it.
        setFlagsFromString('--expose-gc');
        const gc: unknown = runInNewContext('gc');
        if (typeof gc !== 'function') throw new TypeError('V8 did not expose gc()');
        this.collect = gc as () => void;
      }
      const mb = (n: number): number => Math.round(n / 2 ** 20);
      const before = getHeapStatistics();
      const started = performance.now();
      this.collect();
      const after = getHeapStatistics();
      // The heap's figures move at once; the RSS follows as V8 hands the freed pages back, in the background.
      logger.debug({ ms: Math.round(performance.now() - started), heapUsedMb: { before: mb(before.used_heap_size), after: mb(after.used_heap_size) }, heapTotalMb: { before: mb(before.total_heap_size), after: mb(after.total_heap_size) } }, 'idle collection');
    } catch (err) {
      this.disabled = true;
      logger.debug(`idle collection unavailable: ${errorMessage(err)}`);
    }
  }
}
