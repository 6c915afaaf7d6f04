import { randomBytes } from 'node:crypto';
import { chown, open, readFile, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { LoopmeshError, codes, errorCode, errorMessage } from '../errors.js';
import type { Logger } from '../log.js';

export const beginMarker = '# BEGIN loopmesh (managed by loopmesh; edits inside this block are overwritten)';
export const endMarker = '# END loopmesh';

export class HostsFileError extends LoopmeshError {}

/** Lines with their own terminators, so joining them gives back the text byte for byte. */
function splitLines(text: string): string[] {
  return text.match(/[^\n]*\n|[^\n]+$/g) ?? [];
}

const isBegin = (line: string): boolean => /^# BEGIN loopmesh(\s|$)/.test(line.trimEnd());
const isEnd = (line: string): boolean => line.trimEnd() === endMarker;

/**
 * [start, end) line ranges of the complete blocks: each END closes the nearest BEGIN above it. A
 * stray BEGIN or END is left alone rather than guessed at, so no line outside a block is ever lost.
 */
function findBlocks(lines: string[]): Array<[number, number]> {
  const blocks: Array<[number, number]> = [];
  let begin = -1;
  lines.forEach((line, i) => {
    if (isBegin(line)) begin = i;
    else if (isEnd(line) && begin >= 0) {
      blocks.push([begin, i + 1]);
      begin = -1;
    }
  });
  return blocks;
}

function lineEnding(text: string): string {
  const newline = text.indexOf('\n');
  return newline > 0 && text[newline - 1] === '\r' ? '\r\n' : '\n';
}

function renderBlock(lines: string, eol: string): string {
  const body = lines.split(/\r?\n/).filter((line) => !isBegin(line) && !isEnd(line));
  while (body.length > 0 && body[body.length - 1] === '') body.pop();
  return [beginMarker, ...body, endMarker].map((line) => line + eol).join('');
}

function replaceBlocks(lines: string[], blocks: Array<[number, number]>, replacement: string): string {
  let out = '';
  let at = 0;
  blocks.forEach(([start, end], i) => {
    out += lines.slice(at, start).join('') + (i === 0 ? replacement : '');
    at = end;
  });
  return out + lines.slice(at).join('');
}

/**
 * Puts `lines` in the loopmesh block: in place of the existing block (a duplicate block is removed),
 * or appended. Everything outside the block stays exactly as it was; the block uses the file's line ending.
 */
export function spliceHostsBlock(original: string, lines: string): string {
  const eol = lineEnding(original);
  const block = renderBlock(lines, eol);
  const all = splitLines(original);
  const blocks = findBlocks(all);
  if (blocks.length > 0) return replaceBlocks(all, blocks, block);
  const separator = original === '' || original.endsWith('\n') ? '' : eol;
  return original + separator + block;
}

export function removeHostsBlock(original: string): string {
  const all = splitLines(original);
  return replaceBlocks(all, findBlocks(all), '');
}

interface CurrentFile {
  text: string;
  mode: number;
  owner: { uid: number; gid: number };
}

async function readCurrent(path: string): Promise<CurrentFile | undefined> {
  try {
    const [bytes, info] = await Promise.all([readFile(path), stat(path)]);
    // latin1 maps every byte to one char and back: bytes that are not UTF-8 survive untouched.
    return { text: bytes.toString('latin1'), mode: info.mode & 0o7777, owner: { uid: info.uid, gid: info.gid } };
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return undefined;
    throw err;
  }
}

async function replaceByRename(path: string, bytes: Buffer, current: CurrentFile | undefined): Promise<void> {
  const mode = current?.mode ?? 0o644;
  const temp = join(dirname(path), `.${basename(path)}.loopmesh-${randomBytes(6).toString('hex')}.tmp`);
  try {
    const handle = await open(temp, 'wx', mode);
    try {
      await handle.writeFile(bytes);
      await handle.chmod(mode);
      await handle.sync();
    } finally {
      await handle.close();
    }
    if (current && process.getuid?.() === 0) await chown(temp, current.owner.uid, current.owner.gid);
    await rename(temp, path);
  } catch (err) {
    await unlink(temp).catch(() => undefined);
    throw err;
  }
}

/** For a file that cannot be renamed over (a bind mount): overwrite, then cut to the new length. */
async function rewriteInPlace(path: string, bytes: Buffer): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.write(bytes, 0, bytes.length, 0);
    await handle.truncate(bytes.length);
    await handle.sync();
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

/** Paths that turned out to be bind mounts: rewritten in place from then on, warned about once. */
const rewrittenInPlace = new Set<string>();
/** One update at a time per file: each is a read-modify-write. */
const updates = new Map<string, Promise<boolean>>();

async function update(path: string, lines: string, logger: Logger | undefined): Promise<boolean> {
  const current = await readCurrent(path);
  const before = current?.text ?? '';
  const after = spliceHostsBlock(before, Buffer.from(lines, 'utf8').toString('latin1'));
  if (current && after === before) return false;
  const bytes = Buffer.from(after, 'latin1');
  if (rewrittenInPlace.has(path)) {
    await rewriteInPlace(path, bytes);
    return true;
  }
  try {
    await replaceByRename(path, bytes, current);
  } catch (err) {
    const code = errorCode(err);
    const reason = Object.hasOwn(inPlaceReasons, code) ? inPlaceReasons[code] : undefined;
    if (!reason) throw err;
    rewrittenInPlace.add(path);
    const why = reason(dirname(path));
    logger?.warn({ file: path, code }, `${path} cannot be replaced by a rename (${code}: ${why}); rewriting it in place from now on`);
    await rewriteInPlace(path, bytes);
  }
  return true;
}

/**
 * Writes `lines` into the loopmesh block of the hosts file at `path` (a missing file counts as empty).
 * Resolves whether the file changed; throws a HostsFileError (LM_ERR_HOSTS_WRITE) naming the path.
 */
export async function writeHostsBlock(path: string, lines: string, options: { logger?: Logger } = {}): Promise<boolean> {
  const key = resolve(path);
  const previous = updates.get(key) ?? Promise.resolve(false);
  const run = previous
    .catch(() => false)
    .then(() => update(key, lines, options.logger))
    .catch((cause: unknown) => {
      throw new HostsFileError(codes.hostsWrite, `cannot update the hosts file ${path}: ${errorMessage(cause)}`, { cause });
    });
  updates.set(key, run);
  try {
    return await run;
  } finally {
    if (updates.get(key) === run) updates.delete(key);
  }
}
