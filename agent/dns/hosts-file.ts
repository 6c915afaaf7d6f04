import { randomBytes } from 'node:crypto';
import { chown, lstat, open, readlink, realpath, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { LoopmeshError, codes, errorCode, errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import { blockOwners, removeHostsBlock, spliceHostsBlock, type BlockOwner } from './hosts-block.js';

export * from './hosts-block.js';

export class HostsFileError extends LoopmeshError {}


/** Text of the file as latin1: every byte maps to one char and back, so bytes that are not UTF-8 survive. */
const toText = (bytes: Buffer): string => bytes.toString('latin1');
const toBytes = (text: string): Buffer => Buffer.from(text, 'latin1');
/** A UTF-8 string (lines, a path) in the file's latin1 text. */
const utf8AsText = (value: string): string => toText(Buffer.from(value, 'utf8'));
const textAsUtf8 = (value: string): string => toBytes(value).toString('utf8');

const maxLinks = 40;

/**
 * The file that `path` finally names: each symbolic link of a chain followed, relative targets read
 * from the link's real folder. Throws when the chain ends at nothing, since writing there would
 * create a file nobody reads.
 */
async function finalTarget(path: string): Promise<string> {
  const chain = [resolve(path)];
  for (;;) {
    const current = chain[chain.length - 1] ?? '';
    let isLink: boolean;
    try {
      isLink = (await lstat(current)).isSymbolicLink();
    } catch (err) {
      if (errorCode(err) !== 'ENOENT') throw err;
      // No file at all is an empty hosts file; a link to nothing is a mistake to show.
      if (chain.length === 1) return current;
      throw new HostsFileError(
        codes.hostsWrite,
        `${path} is a symbolic link to ${current}, which does not exist (${chain.join(' -> ')}); expected the link to lead to a hosts file: create ${current}, or point --hosts-file at the real file`,
      );
    }
    if (!isLink) return current;
    if (chain.length > maxLinks) throw new HostsFileError(codes.hostsWrite, `${path}: more than ${maxLinks} symbolic links in a row (${chain.slice(0, 4).join(' -> ')} -> ...); expected a chain that ends at a hosts file`);
    chain.push(resolve(await realpath(dirname(current)), await readlink(current)));
  }
}

/** The whole file through `handle`, from offset 0, whatever the handle's position. */
async function readAll(handle: FileHandle): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let position = 0;
  for (;;) {
    const chunk = Buffer.alloc(64 * 1024);
    const { bytesRead } = await handle.read(chunk, 0, chunk.length, position);
    if (bytesRead === 0) return Buffer.concat(chunks);
    chunks.push(chunk.subarray(0, bytesRead));
    position += bytesRead;
  }
}

interface OpenFile {
  handle: FileHandle;
  bytes: Buffer;
  ino: number;
  dev: number;
  mode: number;
  owner: { uid: number; gid: number };
}

async function openCurrent(path: string): Promise<OpenFile | undefined> {
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return undefined;
    throw err;
  }
  try {
    const info = await handle.stat();
    return { handle, bytes: await readAll(handle), ino: info.ino, dev: info.dev, mode: info.mode & 0o7777, owner: { uid: info.uid, gid: info.gid } };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

const startsWith = (bytes: Buffer, prefix: Buffer): boolean => bytes.length >= prefix.length && bytes.subarray(0, prefix.length).equals(prefix);

/** What is at `path` right before the rename, against what the splice was made from. */
async function changedSince(path: string, read: OpenFile | undefined): Promise<'same' | 'appended' | 'replaced'> {
  const info = await stat(path).catch((err: unknown) => {
    if (errorCode(err) === 'ENOENT') return undefined;
    throw err;
  });
  if (!read) return info ? 'replaced' : 'same';
  if (!info || info.ino !== read.ino || info.dev !== read.dev) return 'replaced';
  const now = await readAll(read.handle);
  if (now.equals(read.bytes)) return 'same';
  // Appends need no new splice: they are carried over to the new file after the rename.
  return startsWith(now, read.bytes) ? 'appended' : 'replaced';
}

/** Pauses between looks at the replaced file right after the rename (15 ms in all), for appends to carry over. */
const settleChecksMs = [0, 1, 2, 4, 8];
/** A writer that opened the old file before the rename may write into it later still: one last look then. */
const stragglerDelayMs = 200;
const maxAttempts = 8;

interface Replaced {
  /** The replaced file was rewritten in place after it was read: its new content, to splice again. */
  rewritten?: Buffer;
  /** Everything written to the new file: the splice and the appends carried over. */
  written: Buffer;
}

interface UpdateContext {
  path: string;
  target: string;
  logger: Logger | undefined;
  key: string;
}

/**
 * Copies bytes appended to the replaced file (through `old`, still open) since it was read into the
 * new file (`fresh`, opened O_APPEND so that its own appenders are not overwritten).
 */
async function carryAppends(old: OpenFile, fresh: FileHandle, written: Buffer, context: UpdateContext): Promise<Replaced> {
  let seen = old.bytes;
  let carried = written;
  for (const pause of settleChecksMs) {
    if (pause > 0) await sleep(pause);
    const now = await readAll(old.handle);
    if (now.equals(seen)) continue;
    if (!startsWith(now, seen)) return { rewritten: now, written: carried };
    const extra = now.subarray(seen.length);
    await fresh.write(extra);
    carried = Buffer.concat([carried, extra]);
    context.logger?.info({ file: context.target, bytes: extra.length }, `${extra.length} bytes another program appended to ${context.path} while loopmesh replaced it were carried over`);
    seen = now;
  }
  watchForStragglers(old.handle, seen, context);
  return { written: carried };
}

/** One last look at the replaced file, in the file's queue so that it never races an update. */
function watchForStragglers(handle: FileHandle, seen: Buffer, context: UpdateContext): void {
  const look = async (): Promise<boolean> => {
    try {
      const now = await readAll(handle);
      if (now.length <= seen.length || !startsWith(now, seen)) return false;
      const extra = now.subarray(seen.length);
      const live = await open(context.target, 'a');
      try {
        await live.write(extra);
      } finally {
        await live.close();
      }
      context.logger?.info({ file: context.target, bytes: extra.length }, `${extra.length} bytes another program appended late to the replaced ${context.path} were carried over`);
      return true;
    } catch (err) {
      context.logger?.warn({ file: context.target, code: errorCode(err) }, `cannot carry over late appends to ${context.path}: ${errorMessage(err)}`);
      return false;
    } finally {
      await handle.close().catch(() => undefined);
    }
  };
  pendingStragglers.add(handle);
  setTimeout(() => {
    pendingStragglers.delete(handle);
    void serialize(context.key, look).catch(() => undefined);
  }, stragglerDelayMs).unref();
}

/** The handles kept open for a last look; a process that exits drops them. */
const pendingStragglers = new Set<FileHandle>();

/** Writes `bytes` to a new file next to `target` and renames it over, then carries over late appends. */
async function replaceByRename(read: OpenFile | undefined, bytes: Buffer, context: UpdateContext): Promise<Replaced | 'retry'> {
  const { target } = context;
  const mode = read?.mode ?? 0o644;
  const temp = join(dirname(target), `.${basename(target)}.loopmesh-${randomBytes(6).toString('hex')}.tmp`);
  const handle = await open(temp, 'ax+', mode);
  let renamed = false;
  try {
    await handle.write(bytes);
    await handle.chmod(mode);
    await handle.sync();
    if (read && process.getuid?.() === 0) await chown(temp, read.owner.uid, read.owner.gid);
    // Re-read right before the rename: a file rewritten since is spliced again.
    if ((await changedSince(target, read)) === 'replaced') return 'retry';
    await rename(temp, target);
    renamed = true;
    return read ? await carryAppends(read, handle, bytes, context) : { written: bytes };
  } finally {
    await handle.close();
    if (!renamed) await unlink(temp).catch(() => undefined);
  }
}

/** For a file that cannot be renamed over (a bind mount): overwrite, then cut to the new length. */
async function rewriteInPlace(target: string, compose: (text: string) => string): Promise<boolean> {
  const handle = await open(target, 'r+');
  try {
    const before = await readAll(handle);
    const after = toBytes(compose(toText(before)));
    if (after.equals(before)) return false;
    await handle.write(after, 0, after.length, 0);
    await handle.truncate(after.length);
    await handle.sync();
    return true;
  } finally {
    await handle.close();
  }
}

/**
 * Errors of the rename path after which an in-place rewrite can still work, and why. A systemd unit
 * with ProtectSystem=strict and ReadWritePaths=/etc/hosts gives EROFS: /etc is read-only, the file a
 * writable bind mount.
 */
const inPlaceReasons: Record<string, (folder: string) => string> = {
  EBUSY: () => 'it is probably bind-mounted, as /etc/hosts is in containers',
  EXDEV: () => 'it is probably bind-mounted, as /etc/hosts is in containers',
  EACCES: (folder) => `the folder ${folder} is not writable for this user, only the file may be`,
  EPERM: (folder) => `the folder ${folder} is not writable for this user, only the file may be`,
  EROFS: (folder) => `the folder ${folder} is on a read-only mount, only the file may be writable`,
};

/** Files that turned out to be bind mounts: rewritten in place from then on, warned about once. */
const rewrittenInPlace = new Set<string>();
/** One update at a time per file: each is a read-modify-write. */
const updates = new Map<string, Promise<unknown>>();

function serialize<T>(key: string, task: () => Promise<T>): Promise<T> {
  const run = (updates.get(key) ?? Promise.resolve()).catch(() => undefined).then(task);
  updates.set(key, run);
  const forget = (): void => {
    if (updates.get(key) === run) updates.delete(key);
  };
  run.then(forget, forget);
  return run;
}

/**
 * Replaces the file with `compose` of its content, keeping what other programs write meanwhile:
 * a rewrite before the rename is spliced again, appends to the replaced file are carried over.
 */
async function update(context: UpdateContext, compose: (text: string) => string): Promise<boolean> {
  const { target } = context;
  if (rewrittenInPlace.has(target)) return rewriteInPlace(target, compose);
  let changed = false;
  /** The replaced file's rewrite, to be spliced into the next attempt in place of what was written. */
  let carried: Required<Replaced> | undefined;
  for (let attempt = 0; attempt < maxAttempts; attempt++) {
    const read = await openCurrent(target);
    try {
      const current = read?.bytes ?? Buffer.alloc(0);
      let base = current;
      if (carried && startsWith(current, carried.written)) base = Buffer.concat([carried.rewritten, current.subarray(carried.written.length)]);
      carried = undefined;
      const after = toBytes(compose(toText(base)));
      if (after.equals(current) && (read || after.length === 0)) return changed;
      let outcome: Replaced | 'retry';
      try {
        outcome = await replaceByRename(read, after, context);
      } catch (err) {
        const code = errorCode(err);
        const reason = Object.hasOwn(inPlaceReasons, code) ? inPlaceReasons[code] : undefined;
        if (!reason || !read) throw err;
        rewrittenInPlace.add(target);
        context.logger?.warn({ file: target, code }, `${target} cannot be replaced by a rename (${code}: ${reason(dirname(target))}); rewriting it in place from now on`);
        return (await rewriteInPlace(target, compose)) || changed;
      }
      if (outcome === 'retry') continue;
      changed = true;
      if (!outcome.rewritten) return true;
      carried = { rewritten: outcome.rewritten, written: outcome.written };
    } finally {
      if (read && !pendingStragglers.has(read.handle)) await read.handle.close();
    }
  }
  throw new HostsFileError(
    codes.hostsConcurrent,
    `cannot update the hosts file ${context.path}: another program rewrote it during each of ${maxAttempts} attempts; ` +
      'expected it to stay still for a moment (find the program that keeps rewriting it); the next change tries again',
  );
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists, under another user.
    return errorCode(err) === 'EPERM';
  }
}

export interface WriteHostsOptions {
  /** This agent's identity on the block: its run dir's real path. A hot-restart successor has the same one. */
  owner: string;
  logger?: Logger;
  /** Tells whether a process runs (tests replace it); process.kill(pid, 0) by default. */
  isRunning?: (pid: number) => boolean;
}

/** Refuses a block that another agent (another owner, still running) wrote; says which it takes over. */
function claimBlocks(text: string, owner: string, path: string, running: (pid: number) => boolean): Array<BlockOwner | undefined> {
  const takeOver: Array<BlockOwner | undefined> = [];
  for (const found of blockOwners(text)) {
    if (found?.owner === owner) continue;
    if (found && running(found.pid)) {
      const other = textAsUtf8(found.owner);
      throw new HostsFileError(
        codes.hostsOwned,
        `the loopmesh block in ${path} belongs to another loopmesh agent (owner ${other}, pid ${found.pid}, still running), so this one ` +
          `(owner ${textAsUtf8(owner)}) leaves it alone; expected one agent per hosts file: stop the agent with pid ${found.pid}, ` +
          `or give this one its own file (--hosts-file FILE, or off); if pid ${found.pid} is not a loopmesh agent, delete that block by hand`,
      );
    }
    takeOver.push(found);
  }
  return takeOver;
}

/**
 * Writes `lines` into the loopmesh block of the hosts file at `path` (a missing file counts as empty;
 * a symbolic link is followed and stays a link). Resolves whether the file changed. Throws a
 * HostsFileError naming the path: LM_ERR_HOSTS_OWNED when another running agent owns the block,
 * LM_ERR_HOSTS_CONCURRENT when the file kept changing, LM_ERR_HOSTS_WRITE otherwise.
 */
export async function writeHostsBlock(path: string, lines: string, options: WriteHostsOptions): Promise<boolean> {
  const owner = utf8AsText(options.owner);
  const running = options.isRunning ?? isRunning;
  const block = utf8AsText(lines);
  let takenOver: Array<BlockOwner | undefined> = [];
  const changed = await serializedUpdate(path, options.logger, (text) => {
    takenOver = claimBlocks(text, owner, path, running);
    return spliceHostsBlock(text, block, { owner, pid: process.pid });
  });
  if (changed) {
    for (const previous of takenOver) {
      const from = previous ? `of owner ${textAsUtf8(previous.owner)} (pid ${previous.pid}, no longer running)` : 'with no owner (written by an older loopmesh)';
      options.logger?.info({ file: path, previousOwner: previous ? textAsUtf8(previous.owner) : undefined, previousPid: previous?.pid }, `took over the loopmesh block in ${path} ${from}`);
    }
  }
  return changed;
}

/** Takes this owner's block out of the file at `path` (the others' stay). Resolves whether the file changed. */
export async function removeOwnedHostsBlock(path: string, options: { owner: string; logger?: Logger }): Promise<boolean> {
  const owner = utf8AsText(options.owner);
  return serializedUpdate(path, options.logger, (text) => removeHostsBlock(text, { owner }));
}

async function serializedUpdate(path: string, logger: Logger | undefined, compose: (text: string) => string): Promise<boolean> {
  const key = resolve(path);
  return serialize(key, async () => update({ path, target: await finalTarget(key), logger, key }, compose)).catch((cause: unknown) => {
    if (cause instanceof HostsFileError) throw cause;
    throw new HostsFileError(codes.hostsWrite, `cannot update the hosts file ${path}: ${errorMessage(cause)}`, { cause });
  });
}
