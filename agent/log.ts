import { pino, destination, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export const logLevels: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface LogOptions {
  level: LevelWithSilent;
  /** Human-readable lines instead of JSON; the default when stderr is a terminal. */
  pretty?: boolean;
}

/** The Consul token never reaches a log line, whatever object carries it. */
const redact = {
  paths: ['token', '*.token', '*.*.token', 'consulToken', '*.consulToken', 'headers["x-consul-token"]', '*.headers["x-consul-token"]'],
  censor: '[redacted]',
};

export function createLogger(options: LogOptions): Logger {
  const pretty = options.pretty ?? false;
  if (pretty) {
    return pino({
      level: options.level,
      redact,
      transport: { target: 'pino-pretty', options: { destination: 2, colorize: true, ignore: 'pid,hostname' } },
    });
  }
  // Synchronous: nothing is left in a buffer at exit. A buffered flush at exit into a closed pipe
  // (a log reader that died, a terminal's Ctrl-C that killed `tee`) retries EPIPE forever in
  // sonic-boom's flushSync, and the process never exits; a synchronous write's EPIPE just stops logging.
  return pino({ level: options.level, redact, base: { pid: process.pid } }, destination({ dest: 2, sync: true }));
}

/** For tests and library use: logs nothing. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
