import { parseArgs } from 'node:util';
import { ConfigError, codes, type Problem } from '../errors.js';
import { readConfigFile, readEnv, resolveConfig, settings, type AgentConfig, type RawConfig } from '../config/config.js';

export class UsageError extends ConfigError {
  constructor(message: string) {
    super(codes.configInvalid, message);
  }
}

type OptionSpec = { type: 'string' | 'boolean' };

/** Parses flags strictly; any unknown flag or stray argument is one line naming it. */
export function parseFlags(argv: readonly string[], extra: Record<string, OptionSpec>, allowed?: readonly string[]): Record<string, string | boolean | undefined> {
  const options: Record<string, OptionSpec> = { help: { type: 'boolean' }, ...extra };
  for (const s of settings) if (!allowed || allowed.includes(s.flag)) options[s.flag] = { type: s.boolean ? 'boolean' : 'string' };
  try {
    const { values, positionals } = parseArgs({ args: [...argv], options, strict: true, allowPositionals: true });
    if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"; expected only flags`);
    return values as Record<string, string | boolean | undefined>;
  } catch (err) {
    if (err instanceof UsageError) throw err;
    const message = (err as Error).message;
    const flag = /'(-{1,2}[^' ]+)/.exec(message)?.[1];
    if (/Unknown option/.test(message)) throw new UsageError(`unknown flag ${flag}; expected one of ${Object.keys(options).map((o) => `--${o}`).join(', ')}`);
    if (/argument missing/.test(message)) throw new UsageError(`flag ${flag} expects a value`);
    throw new UsageError(message.split('\n')[0] ?? message);
  }
}

/** Flags -> the same raw layer the config file and environment give. */
export function flagLayer(values: Record<string, string | boolean | undefined>): RawConfig {
  const out: RawConfig = {};
  for (const s of settings) {
    const v = values[s.flag];
    if (v !== undefined) out[s.key] = String(v);
  }
  return out;
}

/** --token on the command line: every local user reads it in the process list (ps, /proc/PID/cmdline). */
export function tokenInArgv(values: Record<string, string | boolean | undefined>): Problem | undefined {
  if (typeof values.token !== 'string') return undefined;
  return {
    code: codes.tokenInArgv,
    message: '--token on the command line is visible to every local user in the process list (ps, /proc/PID/cmdline); pass it with --token-file FILE or the CONSUL_HTTP_TOKEN environment variable instead',
  };
}

export function loadConfig(values: Record<string, string | boolean | undefined>, env: NodeJS.ProcessEnv): AgentConfig {
  const file = typeof values.config === 'string' ? readConfigFile(values.config) : {};
  return resolveConfig(file, readEnv(env), flagLayer(values));
}
