import { Writable } from 'node:stream';
import { pino, type Logger, type LevelWithSilent } from 'pino';

export interface LogLine {
  level: number;
  msg: string;
  code?: string;
  service?: string;
  [key: string]: unknown;
}

/** A real pino logger whose JSON lines are kept, so a test can assert what was reported. */
export function captureLogger(level: LevelWithSilent = 'debug'): { logger: Logger; lines: LogLine[]; text: () => string } {
  const lines: LogLine[] = [];
  const raw: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString('utf8').split('\n').filter(Boolean)) {
        raw.push(line);
        lines.push(JSON.parse(line) as LogLine);
      }
      done();
    },
  });
  return { logger: pino({ level }, stream), lines, text: () => raw.join('\n') };
}
