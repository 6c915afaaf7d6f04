import type { StatusReport } from '../admin/report.js';
import type { AgentConfig } from '../config/config.js';
import { DataPlane } from '../data-plane/data-plane.js';
import { errorCode, errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import { parsePrimaryMessage, workerIndexEnv, type WorkerMessage } from './messages.js';

function send(message: WorkerMessage): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send || !process.connected) return resolve();
    process.send(message, undefined, {}, () => resolve());
  });
}

/**
 * One worker of `loopmesh balancer --workers N` (a cluster worker): the ordinary data plane from the
 * run dir. Its listen() calls go to the supervisor, which binds each address once and hands the same
 * socket to every worker (cluster.SCHED_NONE), so the kernel's accept queue is shared. Only worker 0
 * writes the hosts file. It answers the supervisor's report requests, and drains when told to.
 */
export async function runWorker(config: AgentConfig, baseLog: Logger, report: (plane: DataPlane) => StatusReport): Promise<number> {
  const index = Number(process.env[workerIndexEnv] ?? '0');
  const log = baseLog.child({ worker: index });
  const plane = new DataPlane({ ...config, hostsFile: index === 0 ? config.hostsFile : undefined, logger: log });
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    log.info({ drainTimeoutMs: config.drainTimeoutMs }, 'worker stopping: listeners closed, open connections drain');
    // The counters die with the balancer's services at the end of the drain: the last report taken
    // while they still exist goes to the supervisor, which keeps them in its totals.
    let last = report(plane);
    const keep = setInterval(() => {
      if (plane.balancer.snapshot().length > 0) last = report(plane);
    }, 250);
    void plane
      .close({ drain: true })
      .catch((err: unknown) => log.error({ code: errorCode(err) }, errorMessage(err)))
      .then(() => {
        clearInterval(keep);
        return send({ loopmesh: 'final', report: last });
      })
      .then(() => process.exit(0));
  };
  process.on('message', (raw: unknown) => {
    let message;
    try {
      message = parsePrimaryMessage(raw);
    } catch (err) {
      log.error({ code: errorCode(err) }, errorMessage(err));
      return;
    }
    if (!message) return;
    if (message.loopmesh === 'drain') stop();
    else void send({ loopmesh: 'report', id: message.id, report: report(plane) });
  });
  // The supervisor decides: a terminal's Ctrl-C reaches the whole process group, the supervisor included.
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  // A hot restart is the supervisor's (SIGUSR2 to it); one sent to a worker would otherwise kill it.
  process.on('SIGUSR2', () => log.warn(`SIGUSR2 to a worker does nothing: send it to the supervisor (pid ${process.ppid}), which replaces its workers one by one`));
  try {
    await plane.start();
  } catch (err) {
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    await send({ loopmesh: 'failed', message: errorMessage(err) });
    await plane.close().catch(() => undefined);
    // The IPC channel would keep this process alive.
    process.exit(1);
  }
  log.info({ runDir: config.runDir, writesHostsFile: index === 0 && config.hostsFile !== undefined }, 'loopmesh balancer worker started');
  await send({ loopmesh: 'started' });
  return new Promise<number>(() => undefined);
}
