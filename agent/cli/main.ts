#!/usr/bin/env node
import { Agent } from '../agent.js';
import { ConfigError, errorCode, errorMessage } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import { loadConfig, parseFlags, tokenInArgv, UsageError } from './args.js';
import { settings } from '../config/config.js';
import { renderDryRun } from './render.js';
import { printStatus } from './status.js';
import { runBalancer } from './balancer.js';
import { usage } from './usage.js';

function logger(level: Parameters<typeof createLogger>[0]['level']): Logger {
  return createLogger({ level, pretty: process.stderr.isTTY === true && process.env.LOOPMESH_LOG_FORMAT !== 'json' });
}

/** Stops on SIGINT/SIGTERM; a second signal exits at once. */
function onSignal(stop: () => Promise<void>): void {
  let stopping = false;
  const handler = (): void => {
    if (stopping) process.exit(1);
    stopping = true;
    void stop().then(() => process.exit(0));
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
}

async function runAgent(argv: string[]): Promise<number> {
  // --workers is the balancer's: the agent serves in one process (--render-only + loopmesh balancer --workers N).
  const flags = parseFlags(argv, { config: { type: 'string' } }, settings.map((s) => s.flag).filter((f) => f !== 'workers'));
  if (flags.help) return help(usage.agent());
  const config = loadConfig(flags, process.env);
  const log = logger(config.logLevel);
  const exposed = tokenInArgv(flags);
  if (exposed) log.warn({ code: exposed.code }, exposed.message);
  const agent = new Agent(config, log);
  try {
    await agent.start();
  } catch (err) {
    await agent.stop().catch(() => undefined);
    if (err instanceof ConfigError) throw err;
    log.fatal({ code: errorCode(err) }, errorMessage(err));
    return 1;
  }
  log.info({ consul: config.consul, runDir: config.runDir, dns: config.dns, admin: agent.adminUrl(), hostsFile: config.hostsFile, suffix: config.suffix }, 'loopmesh agent started');
  onSignal(async () => {
    log.info({ drainTimeoutMs: config.drainTimeoutMs }, 'stopping: listeners closed, open connections drain');
    await agent.stop({ drain: true });
  });
  return new Promise<number>(() => undefined);
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
        return await runAgent(rest);
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
      default:
        throw new UsageError(`unknown command "${command}"; expected agent, status, render or balancer`);
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
