import { rmSync } from 'node:fs';
import { chmod, cp, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';

export const nobody = 65534;
const repoRoot = join(import.meta.dirname, '..', '..');
let readable: Promise<string> | undefined;

/**
 * Where user nobody can run loopmesh's code from: the repository itself or, when it sits in a
 * private folder (a clone in /root or in a `mktemp -d` folder), a readable copy of what a child
 * needs, made once per test process and removed when it exits.
 */
export function repoReadableByNobody(): Promise<string> {
  readable ??= (async () => {
    const probe = await execa('setpriv', [`--reuid=${nobody}`, `--regid=${nobody}`, '--clear-groups', 'test', '-r', join(repoRoot, 'agent', 'cli', 'main.ts')], { reject: false });
    if (probe.exitCode === 0) return repoRoot;
    const copy = await mkdtemp(join(tmpdir(), 'loopmesh-nobody-'));
    process.once('exit', () => rmSync(copy, { recursive: true, force: true }));
    await chmod(copy, 0o755);
    for (const part of ['agent', 'templates', 'node_modules', 'package.json', 'tsconfig.json']) await cp(join(repoRoot, part), join(copy, part), { recursive: true });
    await execa('chmod', ['-R', 'a+rX', copy]);
    return copy;
  })();
  return readable;
}
