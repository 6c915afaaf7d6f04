import { constants, type Stats } from 'node:fs';
import { lstat, mkdir, open, readlink, realpath, stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { ConfigError, codes, errorCode, errorMessage } from '../errors.js';

/**
 * The run directory is a trust boundary: whoever can write in it decides what the data plane binds
 * and what reaches the hosts file. So it must belong to the user loopmesh runs as and be writable by
 * nobody else, and each file read from it must be a regular file of that user (or root), not
 * writable by others.
 */

/** Group and other write bits. */
const othersMayWrite = 0o022;

function processUid(): number | undefined {
  return process.getuid?.();
}

function octal(mode: number): string {
  return `0${(mode & 0o7777).toString(8).padStart(3, '0')}`;
}

function kindOf(info: Stats): string {
  if (info.isSymbolicLink()) return 'a symbolic link';
  if (info.isDirectory()) return 'a directory';
  if (info.isFIFO()) return 'a named pipe (FIFO)';
  if (info.isSocket()) return 'a socket';
  if (info.isCharacterDevice() || info.isBlockDevice()) return 'a device';
  return 'not a regular file';
}

/** Throws LM_ERR_RUN_DIR_UNSAFE unless `dir` (a symlink is followed) is a directory of this user, not writable by others. */
export async function checkRunDir(dir: string): Promise<void> {
  const uid = processUid();
  const real = await realpath(dir);
  const info = await stat(real);
  const named = real === resolve(dir) ? real : `${dir} (${real})`;
  if (!info.isDirectory()) {
    throw new ConfigError(codes.runDirUnsafe, `run dir ${named} is ${kindOf(info)}; expected a directory (use another --run-dir)`);
  }
  if (uid === undefined) return;
  if (info.uid !== uid || (info.mode & othersMayWrite) !== 0) {
    throw new ConfigError(
      codes.runDirUnsafe,
      `run dir ${named} is owned by uid ${info.uid} with mode ${octal(info.mode)}; expected owner uid ${uid} (this process) and no write permission for group or others, ` +
        `because whoever can write there decides what loopmesh listens on and what goes into the hosts file. ` +
        `Fix: chown ${uid} ${real} && chmod 755 ${real}, or use another --run-dir`,
    );
  }
}

/** Creates the run dir when missing (mode 0755, parents too), then checks it (checkRunDir). */
export async function prepareRunDir(dir: string): Promise<void> {
  try {
    await mkdir(dir, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new ConfigError(codes.runDirUnsafe, `cannot create the run dir ${dir}: ${errorMessage(err)} (use another --run-dir)`, { cause: err });
  }
  await checkRunDir(dir);
}

function refuse(path: string, why: string): ConfigError {
  return new ConfigError(codes.runDirFile, `${path} ${why}; refused (it is read from the run dir, so only this user may have written it)`);
}

function checkFile(path: string, info: Stats, uid: number | undefined): void {
  if (!info.isFile()) throw refuse(path, `is ${kindOf(info)}; expected a regular file`);
  if (uid === undefined) return;
  if (info.uid !== uid && info.uid !== 0) throw refuse(path, `is owned by uid ${info.uid}; expected a file owned by uid ${uid} (this process) or root`);
  if ((info.mode & othersMayWrite) !== 0) throw refuse(path, `has mode ${octal(info.mode)}; expected no write permission for group or others (chmod 644 ${path})`);
}

/**
 * Reads a file of the run dir, after checking the folder (LM_ERR_RUN_DIR_UNSAFE) and the file
 * (LM_ERR_RUN_DIR_FILE: a symlink, a FIFO, another user's file, a file others may write).
 * A missing file rejects with the usual ENOENT error.
 */
export async function readRunDirFile(path: string): Promise<Buffer> {
  const uid = processUid();
  await checkRunDir(dirname(path));
  const before = await lstat(path);
  if (before.isSymbolicLink()) {
    const target = await readlink(path).catch(() => '?');
    throw refuse(path, `is a symbolic link to ${target}; expected a regular file`);
  }
  // Checked before opening, so a FIFO or a device is never opened at all.
  checkFile(path, before, uid);
  let handle;
  try {
    // O_NOFOLLOW and O_NONBLOCK: a swap to a symlink or a FIFO after the check cannot redirect or block the read.
    handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK | constants.O_NOCTTY);
  } catch (err) {
    if (errorCode(err) === 'ELOOP') throw refuse(path, 'became a symbolic link; expected a regular file');
    throw err;
  }
  try {
    // The file opened is the one checked: a renderer's rename in between is fine, a swap to another user's file is not.
    checkFile(path, await handle.stat(), uid);
    return await handle.readFile();
  } finally {
    await handle.close();
  }
}

/** readRunDirFile as text, or undefined when the file does not exist. */
export async function readRunDirFileIfExists(path: string): Promise<string | undefined> {
  try {
    return (await readRunDirFile(path)).toString('utf8');
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return undefined;
    throw err;
  }
}
