import { backoffDelay, retryBaseMs, retryMaxMs } from './consul/blocking-query.js';

export interface RetryOptions {
  baseMs?: number;
  maxMs?: number;
  random?: () => number;
}

/**
 * "Try again later, with backoff, until it works": one timer at a time, the pause growing with each
 * failure and starting over after a success. For work that failed for a reason outside loopmesh (a
 * port taken, no file descriptor left) and that no later event would otherwise redo.
 */
export class Retry {
  private timer: NodeJS.Timeout | undefined;
  private attempt = 0;
  private stopped = false;

  constructor(
    private readonly run: () => void,
    private readonly options: RetryOptions = {},
  ) {}

  /** After a failure: run again after the next pause, unless a run is already waiting. */
  failed(): void {
    if (this.timer !== undefined || this.stopped) return;
    this.attempt += 1;
    const delay = backoffDelay(this.attempt, this.options.baseMs ?? retryBaseMs, this.options.maxMs ?? retryMaxMs, this.options.random ?? Math.random);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (!this.stopped) this.run();
    }, delay);
    // A retry alone never keeps the process alive.
    this.timer.unref();
  }

  /** After a success: the next failure starts from the shortest pause again. */
  succeeded(): void {
    this.attempt = 0;
  }

  /** Whether a run is waiting for its pause to end. */
  get pending(): boolean {
    return this.timer !== undefined;
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}
