import { randomBytes } from 'node:crypto';
import { open, readFile, rename, stat, unlink, chown } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/**
 * Write, then swap: a temp file in the same folder, fsync, keep the old file's mode (and owner as
 * root), rename over. Readers see the old file or the new one, never half of one.
 * Resolves false, writing nothing, when the file already holds exactly `content`.
 */
export async function writeFileAtomic(path: string, content: string, options: { mode?: number } = {}): Promise<boolean> {
  let mode = options.mode ?? 0o644;
  let owner: { uid: number; gid: number } | undefined;
  try {
    const [current, info] = await Promise.all([readFile(path, 'utf8'), stat(path)]);
    if (current === content) return false;
    mode = info.mode & 0o7777;
    owner = { uid: info.uid, gid: info.gid };
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
  } catch (err) {
    // Whatever failed (ENOSPC on a full disk, say), no temp file is left behind for good.
    await unlink(temp).catch(() => undefined);
    throw err;
  }
  return true;
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
