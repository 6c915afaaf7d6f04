export interface StopOptions {
  handedOver?: boolean;
}

/**
 * The signal life of a serving process (`loopmesh balancer`, and its workers' supervisor): SIGUSR2
 * asks for a hot restart, which waits until the start is done (its default action would kill the
 * process) and is ignored once stopping; SIGINT and SIGTERM stop gracefully, and a second one stops
 * at once, cutting what still drains.
 */
export class SignalLife {
  private state: 'starting' | 'serving' | 'stopping' = 'starting';
  private hotRestartAsked = false;

  constructor(private readonly on: { hotRestart(): void; stop(options?: StopOptions): void; stopNow(): void }) {
    process.on('SIGUSR2', () => this.hotRestart());
  }

  /** SIGINT and SIGTERM stop from now on. */
  listenForStop(): void {
    process.on('SIGINT', () => this.stop());
    process.on('SIGTERM', () => this.stop());
  }

  /** The start is done: a hot restart asked for meanwhile runs now. */
  serving(): void {
    if (this.state === 'starting') this.state = 'serving';
    if (this.hotRestartAsked) this.hotRestart();
  }

  hotRestart(): void {
    if (this.state === 'starting') {
      this.hotRestartAsked = true;
      return;
    }
    if (this.state === 'stopping') return;
    this.on.hotRestart();
  }

  /** With `handedOver`, a successor serves already (a hot restart): what this process owns stays for it. */
  stop(options?: StopOptions): void {
    if (this.state === 'stopping') return this.on.stopNow();
    this.state = 'stopping';
    this.on.stop(options);
  }
}
