import cluster from 'node:cluster';
import { hostname } from 'node:os';
import { failingCodes, routeReport, servingProblems, type StatusReport } from '../admin/report.js';
import { AdminServer } from '../admin/server.js';
import { DataPlane } from '../data-plane/data-plane.js';
import { receiveHandover, reportHandover, type InheritedSockets } from '../hot-restart/handover.js';
import { notifyServiceManager } from '../hot-restart/service-manager.js';
import { errorCode, errorMessage } from '../errors.js';
import { prepareRunDir } from '../fs/run-dir.js';
import type { Logger, LogOptions } from '../log.js';
import { loadConfig, parseFlags } from './args.js';
import { usage } from './usage.js';
import { sleep } from '../sleep.js';
import { SignalLife } from '../signals.js';
import { runSupervisor } from '../workers/run.js';
import { runWorker } from '../workers/worker.js';


/** The data plane alone, from the rendered files: what keeps serving when the control plane is gone. */
export async function runBalancer(argv: string[], makeLogger: (level: LogOptions['level']) => Logger): Promise<number> {
  const flags = parseFlags(argv, { config: { type: 'string' } }, ['run-dir', 'dns', 'hosts-file', 'suffix', 'log-level', 'drain-timeout', 'handover-timeout', 'connect-timeout', 'idle-timeout', 'max-connections', 'queue', 'queue-timeout', 'backend-drain', 'admin', 'admin-public', 'workers', 'gateway-range']);
  if (flags.help) {
    process.stdout.write(usage.balancer);
    return 0;
  }
  const loaded = loadConfig(flags, process.env);
  // A gateway's data plane (its control plane: loopmesh gateway --render-only) has no DNS and no hosts block.
  const config = loaded.gatewayRange ? { ...loaded, dns: undefined, hostsFile: undefined } : loaded;
  const log = makeLogger(config.logLevel);
  // Whoever can write the run dir decides what this process binds: refuse (exit 2) unless it is ours alone.
  await prepareRunDir(config.runDir);
  // --workers N: a supervisor (cluster primary) and N worker processes sharing every listening socket.
  if (cluster.isWorker) return runWorker(config, log, balancerReport);
  if (config.workers > 1) return runSupervisor(config, log, typeof flags.admin === 'string');
  // Started by a running balancer's hot restart (SIGUSR2)? Then take over its sockets and config.
  let inherited: InheritedSockets | undefined;
  try {
    inherited = await receiveHandover(config.handoverTimeoutMs, { gatewayRange: config.gatewayRange });
  } catch (err) {
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    await reportHandover({ started: false, message: errorMessage(err) });
    return 1;
  }
  const plane = new DataPlane({ ...config, logger: log, inherited });
  // Only an explicit --admin: the agent's default port (and a shared config file's admin) belongs to the agent.
  const admin = typeof flags.admin === 'string' && config.admin ? new AdminServer({ endpoint: config.admin, report: () => balancerReport(plane), logger: log.child({ stage: 'admin' }) }) : undefined;
  // Hot restart (an upgrade, say): a new process of the same command line takes over every socket,
  // then this one stops accepting and drains. If the new one fails, this one keeps serving. Asked
  // for while this process still starts, it runs once the start is done (SIGUSR2 would otherwise
  // kill the process: that is its default action).
  const life: SignalLife = new SignalLife({
    hotRestart: () => {
      log.info('SIGUSR2: handing the listening sockets over to a new balancer process');
      plane.handOver({ timeoutMs: config.handoverTimeoutMs }).then(
        (pid) => {
          log.info({ successor: pid }, `balancer process ${pid} serves now; this one stops accepting and drains`);
          life.stop();
        },
        (err: unknown) => log.error({ code: errorCode(err) }, errorMessage(err)),
      );
    },
    stop: () => {
      log.info({ drainTimeoutMs: config.drainTimeoutMs }, 'stopping: listeners closed, open connections drain');
      void Promise.all([admin?.close(), plane.close({ drain: true })]).then(() => process.exit(0));
    },
    stopNow: () => process.exit(1),
  });
  try {
    await plane.start();
    // After a hot restart the predecessor holds the admin port until it has handed over: taken below.
    if (!inherited) await admin?.start();
  } catch (err) {
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    await reportHandover({ started: false, message: errorMessage(err) });
    await admin?.close().catch(() => undefined);
    await plane.close().catch(() => undefined);
    return 1;
  }
  log.info({ runDir: config.runDir, admin: admin?.url(), hotRestart: inherited !== undefined }, inherited ? 'loopmesh data plane started on the sockets of the previous process' : 'loopmesh data plane started');
  // Before the predecessor stops: systemd must follow this process from now on.
  await notifyServiceManager(log);
  await reportHandover({ started: true });
  if (inherited && admin) void startAdminAfterPredecessor(admin, log, config.handoverTimeoutMs);
  life.listenForStop();
  life.serving();
  return new Promise<number>(() => undefined);
}

/** The balancer process's view: ok when every service of the loaded balancer.json listens and the hosts block is fine. */
export function balancerReport(plane: DataPlane): StatusReport {
  const specs = plane.config()?.services ?? [];
  const served = plane.balancer.snapshot();
  const problems = [...servingProblems(specs, served), ...plane.hostsProblems()];
  const reasons = problems.filter((p) => failingCodes.has(p.code));
  return routeReport({
    node: hostname(),
    consul: null,
    lastRenderAt: undefined,
    specs,
    served,
    problems,
    health: { status: reasons.length === 0 ? 'ok' : 'failing', reasons },
    dns: plane.dns?.stats(),
  });
}

/** The predecessor closes its admin once it has our report; until then the port is taken. */
export async function startAdminAfterPredecessor(admin: AdminServer, log: Logger, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await admin.start();
      log.info({ admin: admin.url() }, 'admin HTTP taken over from the previous process');
      return;
    } catch (err) {
      if (Date.now() > deadline) {
        log.error({ code: errorCode(err) }, `${errorMessage(err)}; this process serves without admin HTTP`);
        return;
      }
      await sleep(100);
    }
  }
}
