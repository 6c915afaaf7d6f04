import { AdminServer } from '../admin/server.js';
import type { AgentConfig } from '../config/config.js';
import { errorCode, errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import { Supervisor } from './supervisor.js';
import { SignalLife } from '../signals.js';

/**
 * `loopmesh balancer --workers N` (N > 1), in the primary: the supervisor, the admin (with --admin)
 * and the signals. SIGTERM/SIGINT: every worker drains, then the supervisor exits; a second signal
 * kills them at once. SIGUSR2: the workers are replaced one by one; the supervisor stays.
 */
export async function runSupervisor(config: AgentConfig, log: Logger, withAdmin: boolean): Promise<number> {
  const supervisor = new Supervisor({ workers: config.workers, drainTimeoutMs: config.drainTimeoutMs, logger: log });
  const admin = withAdmin && config.admin ? new AdminServer({ endpoint: config.admin, report: () => supervisor.report(), logger: log.child({ stage: 'admin' }) }) : undefined;
  const life = new SignalLife({
    hotRestart: () => {
      log.info({ workers: config.workers }, 'SIGUSR2: replacing the workers one by one with new ones from the code on disk (this supervisor stays)');
      supervisor.hotRestart().catch((err: unknown) => log.error({ code: errorCode(err) }, errorMessage(err)));
    },
    stop: () => {
      log.info({ drainTimeoutMs: config.drainTimeoutMs }, 'stopping: every worker closes its listeners and drains');
      void Promise.all([admin?.close(), supervisor.stop()]).then(() => process.exit(0));
    },
    stopNow: () => {
      supervisor.kill();
      process.exit(1);
    },
  });
  life.listenForStop();
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
  life.serving();
  return new Promise<number>(() => undefined);
}
