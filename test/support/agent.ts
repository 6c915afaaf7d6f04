import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent } from '../../agent/agent.js';
import { resolveConfig, type AgentConfig } from '../../agent/config/config.js';
import { silentLogger, type Logger } from '../../agent/log.js';
import { freePort } from './net.js';

export const hostsPrelude = '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n# a comment the agent must keep\n';

/** A full agent, in process, on free ports and a temp run dir and hosts file. */
export async function startAgent(consulUrl: string, overrides: Record<string, string> = {}, dir?: string, logger: Logger = silentLogger()): Promise<{ agent: Agent; config: AgentConfig; dir: string; stop: () => Promise<void> }> {
  const base = dir ?? (await mkdtemp(join(tmpdir(), 'loopmesh-it-')));
  if (!dir) await writeFile(join(base, 'hosts'), hostsPrelude);
  const config = resolveConfig({
    consul: consulUrl,
    runDir: join(base, 'run'),
    hostsFile: join(base, 'hosts'),
    dns: `127.0.0.1:${await freePort()}`,
    admin: `127.0.0.1:${await freePort()}`,
    range: '127.78.0.0/16',
    drainTimeout: '2',
    connectTimeout: '1',
    ...overrides,
  });
  const agent = new Agent(config, logger);
  await agent.start();
  return {
    agent,
    config,
    dir: base,
    stop: async () => {
      await agent.stop();
    },
  };
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}
