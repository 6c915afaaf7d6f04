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
  return pino({ level: options.level, redact, base: { pid: process.pid } }, destination(2));
}

/** For tests and library use: logs nothing. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
