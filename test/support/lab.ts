import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';

// What every namespace-lab test needs: whether this host can make namespaces, `lab.sh` with the
// test's own lab settings, a command inside a node, and "this must succeed" with its output.

const repo = join(import.meta.dirname, '..', '..');

/** Why network namespaces cannot be made here (the lab tests are then skipped), or undefined. */
export async function cannotMakeNamespaces(prefix: string): Promise<string | undefined> {
  if (process.platform !== 'linux') return `network namespaces need Linux (this is ${process.platform})`;
  const probe = `${prefix}-probe${process.pid}`;
  const r = await execa('ip', ['netns', 'add', probe], { reject: false });
  if (r.exitCode !== 0) return `this host cannot create network namespaces ('ip netns add' failed: ${String(r.stderr || r.message).trim()}); the lab tests need root on Linux`;
  await execa('ip', ['netns', 'del', probe], { reject: false });
  return undefined;
}

export interface LabHarness {
  /** scripts/lab.sh ARGS with the lab's environment (never throws: look at exitCode). */
  lab(args: string[], timeoutMs?: number): ReturnType<typeof execa>;
  /** CMD inside node N (node1, server), like `lab.sh exec` without a bash in between. */
  inNode(n: string, cmd: string[], timeoutMs?: number): ReturnType<typeof execa>;
  /** The trimmed stdout of a command that must succeed; otherwise an error with its output. */
  must(p: ReturnType<typeof execa>, what: string): Promise<string>;
  /** `lab.sh down` (a lab left over by an interrupted run goes first), then `up`: its time in ms. */
  freshUp(): Promise<number>;
}

export function labHarness(prefix: string, env: Record<string, string>): LabHarness {
  const lab = (args: string[], timeoutMs = 180_000) => execa('bash', [join(repo, 'scripts', 'lab.sh'), ...args], { env, reject: false, timeout: timeoutMs, all: true });
  const inNode = (n: string, cmd: string[], timeoutMs = 30_000) => execa('ip', ['netns', 'exec', `${prefix}-${n}`, ...cmd], { reject: false, timeout: timeoutMs, cwd: repo });
  const must = async (p: ReturnType<typeof execa>, what: string): Promise<string> => {
    const r = await p;
    if (r.exitCode !== 0) throw new Error(`${what}: exit ${r.exitCode}: ${String(r.stderr ?? '')}${String(r.stdout ?? '')}${'all' in r ? String(r.all ?? '') : ''}`.slice(0, 3000));
    return String(r.stdout ?? '').trim();
  };
  const freshUp = async (): Promise<number> => {
    await lab(['down'], 60_000);
    const started = Date.now();
    const up = await lab(['up'], 240_000);
    if (up.exitCode !== 0) throw new Error(`lab.sh up failed (exit ${up.exitCode}):\n${String(up.all).slice(-3000)}`);
    return Date.now() - started;
  };
  return { lab, inNode, must, freshUp };
}

/** Every process a lab ran: the recorded pids and whatever is in its namespaces. */
export async function labPids(labPrefix: string, labState: string): Promise<Set<number>> {
  const pids = new Set<number>();
  if (existsSync(labState)) {
    for (const dir of readdirSync(labState)) {
      const d = join(labState, dir);
      if (!dir.startsWith(`${labPrefix}-`) || !existsSync(d)) continue;
      for (const f of readdirSync(d).filter((x) => x.endsWith('.pid'))) pids.add(Number(readFileSync(join(d, f), 'utf8')));
    }
  }
  const list = String((await execa('ip', ['netns', 'list'], { reject: false })).stdout).split('\n').map((l) => l.split(' ')[0] ?? '');
  for (const ns of list.filter((n) => n.startsWith(`${labPrefix}-`))) {
    const r = await execa('ip', ['netns', 'pids', ns], { reject: false });
    for (const p of String(r.stdout).split('\n').filter(Boolean)) pids.add(Number(p));
  }
  return pids;
}
