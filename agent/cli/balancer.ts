import { DataPlane } from '../data-plane/data-plane.js';
import { errorCode, errorMessage } from '../errors.js';
import type { Logger, LogOptions } from '../log.js';
import { loadConfig, parseFlags } from './args.js';
import { usage } from './usage.js';

/** The data plane alone, from the rendered files: what keeps serving when the control plane is gone. */
export async function runBalancer(argv: string[], makeLogger: (level: LogOptions['level']) => Logger): Promise<number> {
  const flags = parseFlags(argv, { config: { type: 'string' } }, ['run-dir', 'dns', 'hosts-file', 'suffix', 'log-level', 'drain-timeout', 'connect-timeout']);
  if (flags.help) {
    process.stdout.write(usage.balancer);
    return 0;
  }
  const config = loadConfig(flags, process.env);
  const log = makeLogger(config.logLevel);
  const plane = new DataPlane({ ...config, logger: log });
  try {
    await plane.start();
  } catch (err) {
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    await plane.close().catch(() => undefined);
    return 1;
  }
  log.info({ runDir: config.runDir }, 'loopmesh data plane started');
  let stopping = false;
  const stop = (): void => {
    // A second signal stops at once, cutting what is still draining.
    if (stopping) process.exit(1);
    stopping = true;
    log.info({ drainTimeoutMs: config.drainTimeoutMs }, 'stopping: listeners closed, open connections drain');
    void plane.close({ drain: true }).then(() => process.exit(0));
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  return new Promise<number>(() => undefined);
}
