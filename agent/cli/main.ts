#!/usr/bin/env node
import { Agent } from '../agent.js';
import { ConfigError, codes, errorCode, errorMessage } from '../errors.js';
import type { AgentConfig } from '../config/config.js';
import { receiveHandover, reportHandover, type InheritedSockets } from '../hot-restart/handover.js';
import { notifyServiceManager } from '../hot-restart/service-manager.js';
import { SignalLife } from '../signals.js';
import { createLogger, type Logger } from '../log.js';
import { loadConfig, parseFlags, tokenInArgv, UsageError } from './args.js';
import { settings } from '../config/config.js';
import { renderDryRun } from './render.js';
import { printStatus } from './status.js';
import { runBalancer, startAdminAfterPredecessor } from './balancer.js';
import { runDoctorCommand } from './doctor.js';
import { usage } from './usage.js';

function logger(level: Parameters<typeof createLogger>[0]['level']): Logger {
  return createLogger({ level, pretty: process.stderr.isTTY === true && process.env.LOOPMESH_LOG_FORMAT !== 'json' });
}

/** How long a successor gets to take over the sockets and serve (hot restart). */
/** Flags only `loopmesh gateway` takes. */
const gatewayOnly = ['gateway-range', 'gateway-id', 'gateway-check'];

/**
 * `loopmesh agent` (a node) and `loopmesh gateway` (the proxy cluster): control plane and data plane
 * in one process. SIGUSR2 is a hot restart: a new process of the same command line takes over every
 * listening socket (and the gateway's registration), then this one stops its control plane and drains.
 */
async function runAgent(argv: string[], mode: 'agent' | 'gateway'): Promise<number> {
  // --workers is the balancer's: the agent serves in one process (--render-only + loopmesh balancer --workers N).
  // A gateway has no DNS responder and no hosts block: nobody on its node connects by name through it.
  const allowed = settings.map((s) => s.flag).filter((f) => f !== 'workers' && (mode === 'gateway' ? f !== 'dns' && f !== 'hosts-file' : !gatewayOnly.includes(f)));
  const flags = parseFlags(argv, { config: { type: 'string' } }, allowed);
  if (flags.help) return help(mode === 'gateway' ? usage.gateway() : usage.agent());
  const config = gatewayConfig(loadConfig(flags, process.env), mode);
  const log = logger(config.logLevel);
  const exposed = tokenInArgv(flags);
  if (exposed) log.warn({ code: exposed.code }, exposed.message);
  // Started by a running agent's hot restart? Then take over its sockets and routes.
  let inherited: InheritedSockets | undefined;
  try {
    inherited = await receiveHandover(config.handoverTimeoutMs, { gatewayRange: config.gatewayRange });
  } catch (err) {
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    await reportHandover({ started: false, message: errorMessage(err) });
    return 1;
  }
  const agent = new Agent(config, log, inherited);
  const life: SignalLife = new SignalLife({
    hotRestart: () => {
      const plane = agent.dataPlane;
      if (!plane) return log.warn('SIGUSR2: with --render-only there is no data plane here to hand over; restart this process instead');
      log.info(`SIGUSR2: handing the listening sockets over to a new ${mode} process`);
      plane.handOver({ timeoutMs: config.handoverTimeoutMs }).then(
        (pid) => {
          log.info({ successor: pid }, `${mode} process ${pid} serves now; this one stops its control plane and drains`);
          life.stop({ handedOver: true });
        },
        (err: unknown) => log.error({ code: errorCode(err) }, errorMessage(err)),
      );
    },
    stop: (options) => {
      log.info({ drainTimeoutMs: config.drainTimeoutMs }, 'stopping: listeners closed, open connections drain');
      void agent.stop({ drain: true, handedOver: options?.handedOver === true }).then(() => process.exit(0));
    },
    stopNow: () => process.exit(1),
  });
  try {
    // After a hot restart the predecessor holds the admin port until it has handed over: taken below.
    await agent.start({ admin: !inherited });
  } catch (err) {
    await agent.stop().catch(() => undefined);
    await reportHandover({ started: false, message: errorMessage(err) });
    if (err instanceof ConfigError) throw err;
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    return 1;
  }
  log.info(
    { consul: config.consul, runDir: config.runDir, dns: config.dns, admin: agent.adminUrl(), hostsFile: config.hostsFile, suffix: config.suffix, gatewayRange: config.gatewayRange?.cidr, hotRestart: inherited !== undefined },
    `loopmesh ${mode} started`,
  );
  // Before the predecessor stops: systemd must follow this process from now on.
  await notifyServiceManager(log);
  await reportHandover({ started: true });
  const admin = agent.adminServer();
  if (inherited && admin) void startAdminAfterPredecessor(admin, log, config.handoverTimeoutMs);
  life.listenForStop();
  life.serving();
  return new Promise<number>(() => undefined);
}

/** A gateway: --gateway-range required, Consul's check needs a URL; DNS and hosts are off. A node: no gateway flags. */
function gatewayConfig(config: AgentConfig, mode: 'agent' | 'gateway'): AgentConfig {
  if (mode === 'agent') {
    if (config.gatewayRange) throw new ConfigError(codes.configInvalid, `--gateway-range (LOOPMESH_GATEWAY_RANGE) is "${config.gatewayRange.cidr}", but it is for 'loopmesh gateway' only; expected it unset for 'loopmesh agent'`);
    return config;
  }
  if (!config.gatewayRange) throw new ConfigError(codes.configInvalid, "loopmesh gateway: --gateway-range (LOOPMESH_GATEWAY_RANGE) is required; expected the CIDR range, reachable from the other nodes, on which this gateway serves every service (for example 10.77.77.128/27)");
  if (!config.gatewayService) throw new ConfigError(codes.configInvalid, 'loopmesh gateway: --gateway-service is "off"; expected the Consul service name the gateway registers as (default loopmesh-gateway)');
  if (!config.admin && !config.gatewayCheck) throw new ConfigError(codes.configInvalid, "loopmesh gateway: --admin is off and no --gateway-check is given; expected one of them: Consul's HTTP check of the gateway asks --admin's /health/live, or the --gateway-check URL");
  return { ...config, dns: undefined, hostsFile: undefined };
}

function help(text: string): number {
  process.stdout.write(text);
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case undefined:
      case '--help':
      case '-h':
      case 'help':
        return help(usage.main);
      case 'agent':
        return await runAgent(rest, 'agent');
      case 'gateway':
        return await runAgent(rest, 'gateway');
      case 'status':
        return await printStatus(rest);
      case 'render': {
        // render logs nothing, so the warning goes to stderr; it still runs, as the agent does.
        const exposed = rest.some((a) => a === '--token' || a.startsWith('--token=')) ? tokenInArgv({ token: '' }) : undefined;
        if (exposed) process.stderr.write(`loopmesh: warning ${exposed.code}: ${exposed.message}\n`);
        return await renderDryRun(rest);
      }
      case 'balancer':
        return await runBalancer(rest, logger);
      case 'doctor':
        return await runDoctorCommand(rest);
      default:
        throw new UsageError(`unknown command "${command}"; expected agent, gateway, status, render, balancer or doctor`);
    }
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`loopmesh: ${err.message}\n`);
      return 2;
    }
    process.stderr.write(`loopmesh: ${errorCode(err)}: ${errorMessage(err)}\n`);
    return 1;
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
