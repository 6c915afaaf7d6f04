import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, chown, cp, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beginMarker, endMarker, HostsFileError, removeHostsBlock, spliceHostsBlock, writeHostsBlock } from '../../../agent/dns/hosts-file.js';

const run = promisify(execFile);
const lines = '127.77.0.2 web.local\n127.77.0.3 redis.local\n';
const block = `${beginMarker}\n127.77.0.2 web.local\n127.77.0.3 redis.local\n${endMarker}\n`;
const crlfBlock = block.replace(/\n/g, '\r\n');

const spliceCases: Array<{ what: string; original: string; expected: string }> = [
  { what: 'an empty file gets the block', original: '', expected: block },
  { what: 'appended after a final newline', original: '127.0.0.1\tlocalhost\n\n# keep me\n', expected: `127.0.0.1\tlocalhost\n\n# keep me\n${block}` },
  { what: 'a newline is added before the block when the file lacks one', original: '127.0.0.1 localhost', expected: `127.0.0.1 localhost\n${block}` },
  { what: 'a CRLF file keeps its bytes and gets a CRLF block', original: '127.0.0.1 localhost\r\n# c\r\n', expected: `127.0.0.1 localhost\r\n# c\r\n${crlfBlock}` },
  {
    what: 'an existing block is replaced in place; the lines around it stay',
    original: `# top\r\n\r\n${beginMarker}\n10.0.0.1 old.local\n${endMarker}\n  # after, indented\n::1 ip6-localhost`,
    expected: `# top\r\n\r\n${crlfBlock}  # after, indented\n::1 ip6-localhost`,
  },
  { what: 'a block with an older BEGIN text and no final newline is replaced', original: `a\n# BEGIN loopmesh\nold\n${endMarker}`, expected: `a\n${block}` },
  { what: 'a second block is removed', original: `${beginMarker}\nx\n${endMarker}\nmid\n${beginMarker}\ny\n${endMarker}\nend\n`, expected: `${block}mid\nend\n` },
  {
    what: 'a stray END above and a BEGIN with no END are left alone',
    original: `${endMarker}\nkeep 1\n# BEGIN loopmesh\nkeep 2\n`,
    expected: `${endMarker}\nkeep 1\n# BEGIN loopmesh\nkeep 2\n${block}`,
  },
];

for (const c of spliceCases) {
  test(`spliceHostsBlock: ${c.what}`, () => {
    const once = spliceHostsBlock(c.original, lines);
    assert.equal(once, c.expected);
    assert.equal(spliceHostsBlock(once, lines), once, 'idempotent');
  });
}

test('spliceHostsBlock: marker lines inside the content are dropped, so the block cannot be split', () => {
  assert.equal(spliceHostsBlock('', `1.2.3.4 a.local\n${endMarker}\n# BEGIN loopmesh\n`), `${beginMarker}\n1.2.3.4 a.local\n${endMarker}\n`);
});

test('removeHostsBlock: takes out the block, markers included, and nothing else', () => {
  const original = `a\r\n${beginMarker}\r\nx\r\n${endMarker}\r\nb`;
  assert.equal(removeHostsBlock(original), 'a\r\nb');
  assert.equal(removeHostsBlock(spliceHostsBlock('a\nb\n', lines)), 'a\nb\n');
  assert.equal(removeHostsBlock('no block here'), 'no block here');
});

async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-hosts-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test('writeHostsBlock: keeps every byte outside the block, also bytes that are not UTF-8; a second write changes nothing', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  const before = Buffer.concat([Buffer.from('127.0.0.1 localhost\r\n# caf'), Buffer.from([0xe9, 0xff]), Buffer.from('\n\n::1 ip6-localhost')]);
  await writeFile(path, before);
  assert.equal(await writeHostsBlock(path, lines), true);
  const written = await readFile(path);
  assert.deepEqual(written.subarray(0, before.length), before, 'everything before the block, byte for byte');
  assert.equal(written.subarray(before.length).toString('latin1'), `\r\n${crlfBlock}`);
  const first = await stat(path);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(await writeHostsBlock(path, lines), false);
  const second = await stat(path);
  assert.deepEqual([second.mtimeMs, second.ino], [first.mtimeMs, first.ino], 'not rewritten');
  assert.deepEqual(await readFile(path), written);
  assert.deepEqual(await readdir(dir), ['hosts'], 'no temp file left behind');
});

test('writeHostsBlock: replaces the block of an earlier write; the rest stays', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '# head\n');
  await writeHostsBlock(path, lines);
  await writeFile(path, `${await readFile(path, 'utf8')}# tail\n`);
  assert.equal(await writeHostsBlock(path, '127.77.0.9 db.local\n'), true);
  assert.equal(await readFile(path, 'utf8'), `# head\n${beginMarker}\n127.77.0.9 db.local\n${endMarker}\n# tail\n`);
});

test('writeHostsBlock: a missing file is created with mode 644', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  assert.equal(await writeHostsBlock(path, lines), true);
  assert.equal(await readFile(path, 'utf8'), block);
  assert.equal((await stat(path)).mode & 0o777, 0o644);
});

test('writeHostsBlock: keeps the file mode, and the owner when running as root', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, 'x\n');
  await chmod(path, 0o640);
  const root = process.getuid?.() === 0;
  if (root) await chown(path, 4242, 4343);
  assert.equal(await writeHostsBlock(path, lines), true);
  const info = await stat(path);
  assert.equal(info.mode & 0o7777, 0o640);
  if (!root) return t.skip('not root: owner check skipped (mode checked)');
  assert.deepEqual([info.uid, info.gid], [4242, 4343]);
});

test('writeHostsBlock: concurrent writes to one file run one after the other', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, 'keep\n');
  const results = await Promise.all(['1.1.1.1 a.local\n', '2.2.2.2 b.local\n', '2.2.2.2 b.local\n'].map((l) => writeHostsBlock(path, l)));
  assert.deepEqual(results, [true, true, false]);
  assert.equal(await readFile(path, 'utf8'), `keep\n${beginMarker}\n2.2.2.2 b.local\n${endMarker}\n`);
});

test('writeHostsBlock: a failure is a HostsFileError LM_ERR_HOSTS_WRITE naming the path', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'no-such-dir', 'hosts');
  await assert.rejects(writeHostsBlock(path, lines), (err: unknown) => {
    assert.ok(err instanceof HostsFileError);
    assert.equal(err.code, 'LM_ERR_HOSTS_WRITE');
    assert.ok(err.message.includes(path), err.message);
    return true;
  });
});

async function canUnshare(): Promise<boolean> {
  return run('unshare', ['--mount', 'true']).then(
    () => true,
    () => false,
  );
}

test('a real resolver lookup (getent, /etc/hosts bind-mounted in a private mount namespace) finds the block', async (t) => {
  if (!(await canUnshare())) return t.skip('cannot create a mount namespace here (needs root and unshare): getent check skipped');
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n');
  await writeHostsBlock(path, '127.77.0.2 web.local\n');
  const { stdout } = await run('unshare', ['--mount', 'sh', '-c', `mount --bind "${path}" /etc/hosts && getent hosts web.local`]);
  assert.deepEqual(stdout.trim().split(/\s+/), ['127.77.0.2', 'web.local']);
});

test('a bind-mounted hosts file (rename fails with EBUSY) is rewritten in place, with one warning', async (t) => {
  if (!(await canUnshare())) return t.skip('cannot create a mount namespace here (needs root and unshare): bind-mount fallback check skipped');
  const dir = await tempDir(t);
  const source = join(dir, 'source');
  const target = join(dir, 'target');
  await writeFile(source, '# original\n');
  await chmod(source, 0o604);
  await writeFile(target, '');
  const module = new URL('../../../agent/dns/hosts-file.ts', import.meta.url).href;
  const script = `
    const { writeHostsBlock } = await import(${JSON.stringify(module)});
    const warnings = [];
    const logger = { warn: (fields, message) => warnings.push({ code: fields.code, message }) };
    const first = await writeHostsBlock(${JSON.stringify(target)}, '127.77.0.2 web.local\\n', { logger });
    const second = await writeHostsBlock(${JSON.stringify(target)}, '127.77.0.3 web.local\\n', { logger });
    process.stdout.write(JSON.stringify({ first, second, warnings }));
  `;
  const child = await run('unshare', ['--mount', 'sh', '-c', `mount --bind "${source}" "${target}" && exec "${process.execPath}" --import tsx --input-type=module -e '${script.replace(/'/g, `'\\''`)}'`], { cwd: new URL('../../..', import.meta.url).pathname });
  const result = JSON.parse(child.stdout) as { first: boolean; second: boolean; warnings: Array<{ code: string; message: string }> };
  assert.deepEqual([result.first, result.second], [true, true]);
  assert.equal(result.warnings.length, 1, 'warned once');
  assert.equal(result.warnings[0]?.code, 'EBUSY');
  assert.match(result.warnings[0]?.message ?? '', /bind-mounted/);
  assert.equal(await readFile(source, 'utf8'), `# original\n${beginMarker}\n127.77.0.3 web.local\n${endMarker}\n`, 'written through the mount, in place');
  assert.equal((await stat(source)).mode & 0o777, 0o604);
  assert.deepEqual((await readdir(dir)).sort(), ['source', 'target'], 'no temp file left behind');
});

interface ChildWrite {
  changed: boolean;
  uid: number;
  warnings: Array<{ code: string; message: string }>;
}

/** Runs writeHostsBlock in a child started through `wrapper` (setpriv, unshare...), the way a unit would start the agent. */
async function writeInChild(wrapper: string[], path: string, home: string, root = repoRoot): Promise<ChildWrite> {
  const module = pathToFileURL(join(root, 'agent', 'dns', 'hosts-file.ts')).href;
  const script = `
    const { writeHostsBlock } = await import(${JSON.stringify(module)});
    const warnings = [];
    const logger = { warn: (fields, message) => warnings.push({ code: fields.code, message }) };
    const changed = await writeHostsBlock(${JSON.stringify(path)}, '127.77.0.2 web.local\\n', { logger });
    process.stdout.write(JSON.stringify({ changed, warnings, uid: process.getuid() }));
  `;
  const [command = '', ...args] = wrapper;
  const child = await run(command, [...args, process.execPath, '--import', 'tsx', '--input-type=module', '-e', script], {
    cwd: root,
    env: { ...process.env, HOME: home },
  });
  return JSON.parse(child.stdout) as ChildWrite;
}

const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));

/**
 * The code as user nobody can read it: the repository itself, or, when it sits in a private folder
 * (a clone in /root or in a `mktemp -d` folder), a copy of what the child needs in a readable one.
 */
async function readableByNobody(t: TestContext): Promise<string> {
  const probe = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'test', '-r', join(repoRoot, 'agent', 'dns', 'hosts-file.ts')]).then(() => true, () => false);
  if (probe) return repoRoot;
  const copy = await tempDir(t);
  await chmod(copy, 0o755);
  for (const part of ['agent', 'node_modules', 'package.json', 'tsconfig.json']) await cp(join(repoRoot, part), join(copy, part), { recursive: true });
  await run('chmod', ['-R', 'a+rX', copy]);
  t.diagnostic(`the repository is not readable by nobody; the child runs from a copy in ${copy}`);
  return copy;
}

const expectedAfterChild = `127.0.0.1 localhost\n# mine\n${beginMarker}\n127.77.0.2 web.local\n${endMarker}\n`;

test('an unprivileged agent with write access to the file but not its folder rewrites it in place (EACCES)', async (t) => {
  if (process.getuid?.() !== 0) return t.skip('needs root to run a child as another user (setpriv): unprivileged fallback check skipped');
  const dir = await tempDir(t);
  await chmod(dir, 0o755);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n# mine\n');
  await chown(path, 65534, 65534);
  const before = await stat(path);
  const result = await writeInChild(['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'], path, dir, await readableByNobody(t));
  assert.equal(result.uid, 65534);
  assert.equal(result.changed, true);
  assert.equal(result.warnings[0]?.code, 'EACCES');
  assert.match(result.warnings[0]?.message ?? '', /not writable for this user/);
  assert.equal(await readFile(path, 'utf8'), expectedAfterChild);
  assert.equal((await stat(path)).ino, before.ino, 'the same file, not a new one');
  assert.deepEqual(await readdir(dir), ['hosts'], 'no temp file left behind');
});

test('a file bind-mounted writable in a read-only folder (ProtectSystem=strict + ReadWritePaths) is rewritten in place (EROFS)', async (t) => {
  if (process.getuid?.() !== 0) return t.skip('needs root for a private mount namespace (unshare --mount): read-only folder check skipped');
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n# mine\n');
  // In a private mount namespace: the folder read-only, the file a writable bind mount on top, as
  // systemd sets up /etc and /etc/hosts for the Vagrant lab's balancer unit.
  const mounts = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && mount --bind "$1/hosts" "$1/hosts" && mount -o remount,bind,rw "$1/hosts" && shift && exec "$@"';
  const result = await writeInChild(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', mounts, 'sh', dir], path, dir);
  assert.equal(result.changed, true);
  assert.equal(result.warnings[0]?.code, 'EROFS');
  assert.match(result.warnings[0]?.message ?? '', /read-only mount/);
  assert.equal(await readFile(path, 'utf8'), expectedAfterChild);
  assert.deepEqual(await readdir(dir), ['hosts'], 'no temp file left behind');
});
