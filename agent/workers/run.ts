import { AdminServer } from '../admin/server.js';
import type { AgentConfig } from '../config/config.js';
import { errorCode, errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import { Supervisor } from './supervisor.js';

/**
 * `loopmesh balancer --workers N` (N > 1), in the primary: the supervisor, the admin (with --admin)
 * and the signals. SIGTERM/SIGINT: every worker drains, then the supervisor exits; a second signal
 * kills them at once. SIGUSR2: the workers are replaced one by one; the supervisor stays.
 */
export async function runSupervisor(config: AgentConfig, log: Logger, withAdmin: boolean): Promise<number> {
  const supervisor = new Supervisor({ workers: config.workers, drainTimeoutMs: config.drainTimeoutMs, logger: log });
  const admin = withAdmin && config.admin ? new AdminServer({ endpoint: config.admin, report: () => supervisor.report(), logger: log.child({ stage: 'admin' }) }) : undefined;
  let state: 'starting' | 'serving' | 'stopping' = 'starting';
  let hotRestartAsked = false;
  const hotRestart = (): void => {
    if (state === 'starting') {
      hotRestartAsked = true;
      return;
    }
    if (state === 'stopping') return;
    log.info({ workers: config.workers }, 'SIGUSR2: replacing the workers one by one with new ones from the code on disk (this supervisor stays)');
    supervisor.hotRestart().catch((err: unknown) => log.error({ code: errorCode(err) }, errorMessage(err)));
  };
  const stop = (): void => {
    if (state === 'stopping') {
      supervisor.kill();
      process.exit(1);
    }
    state = 'stopping';
    log.info({ drainTimeoutMs: config.drainTimeoutMs }, 'stopping: every worker closes its listeners and drains');
    void Promise.all([admin?.close(), supervisor.stop()]).then(() => process.exit(0));
  };
  process.on('SIGUSR2', hotRestart);
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  try {
    await admin?.start();
    await supervisor.start();
  } catch (err) {
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    await admin?.close().catch(() => undefined);
    await supervisor.stop();
    return 1;
  }
  log.info({ runDir: config.runDir, admin: admin?.url(), workers: supervisor.pids() }, `loopmesh data plane started: ${config.workers} workers share every listening socket`);
  if (state === 'starting') state = 'serving';
  if (hotRestartAsked) hotRestart();
  return new Promise<number>(() => undefined);
}
