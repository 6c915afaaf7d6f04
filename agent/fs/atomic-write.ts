import { randomBytes } from 'node:crypto';
import type { BigIntStats } from 'node:fs';
import { open, readFile, rename, stat, unlink, chown } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';

/** The file identity that any other writer changes: inode (a rename over it), size, change time (a write in place, a chmod). */
function identity(info: BigIntStats): string {
  return `${info.dev}:${info.ino}:${info.size}:${info.ctimeNs}`;
}

/** Per absolute path, what this process last wrote or found there, and the file's identity then. */
const lastWritten = new Map<string, { content: string; identity: string }>();

/**
 * Write, then swap: a temp file in the same folder, fsync, keep the old file's mode (and owner as
 * root), rename over. Readers see the old file or the new one, never half of one.
 * Resolves false, writing nothing, when the file already holds exactly `content`.
 */
export async function writeFileAtomic(path: string, content: string, options: { mode?: number } = {}): Promise<boolean> {
  let mode = options.mode ?? 0o644;
  let owner: { uid: number; gid: number } | undefined;
  try {
    const info = await stat(path, { bigint: true });
    // What this process wrote there last, if the file is still that very file (same inode, size and
    // change time): no need to read megabytes back to see it holds `content`.
    const memo = lastWritten.get(resolve(path));
    const known = memo !== undefined && memo.identity === identity(info);
    if (known && memo.content === content) return false;
    // Known to hold something else: written without reading it back.
    const current = known ? undefined : await readFile(path, 'utf8');
    if (current === content) {
      lastWritten.set(resolve(path), { content, identity: identity(info) });
      return false;
    }
    mode = Number(info.mode) & 0o7777;
    owner = { uid: Number(info.uid), gid: Number(info.gid) };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const temp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  const handle = await open(temp, 'wx', mode);
  try {
    try {
      await handle.writeFile(content, 'utf8');
      await handle.chmod(mode);
      await handle.sync();
    } finally {
      await handle.close();
    }
    if (owner && process.getuid?.() === 0) await chown(temp, owner.uid, owner.gid);
    await rename(temp, path);
    lastWritten.set(resolve(path), { content, identity: identity(await stat(path, { bigint: true })) });
  } catch (err) {
    // Whatever failed (ENOSPC on a full disk, say), no temp file is left behind for good.
    await unlink(temp).catch(() => undefined);
    throw err;
  }
  return true;
}

/** Whether the file at `path` is still the one this process wrote there last (see writeFileAtomic). */
export async function isLastWrittenHere(path: string): Promise<boolean> {
  const memo = lastWritten.get(resolve(path));
  if (memo === undefined) return false;
  try {
    return identity(await stat(path, { bigint: true })) === memo.identity;
  } catch {
    return false;
  }
}

/** Reads a file, or undefined when it does not exist. */
export async function readFileIfExists(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}
