import { repoReadableByNobody } from '../../support/nobody.js';
import { chmod, chown, mkdir, mkdtemp, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { ConfigError, codes } from '../../../agent/errors.js';
import { checkRunDir, prepareRunDir, readRunDirFile, readRunDirFileIfExists } from '../../../agent/fs/run-dir.js';

const uid = process.getuid?.() ?? 0;
/** A uid that is not this process's (the tests run as root). */
const otherUid = uid === 65534 ? 1 : 65534;

async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-run-dir-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function isCode(code: string, ...parts: string[]) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${String(err)}`);
    assert.equal(err.code, code);
    for (const part of parts) assert.ok(err.message.includes(part), `the message names ${part}: ${err.message}`);
    return true;
  };
}

test('prepareRunDir creates a missing run dir and its parents with mode 0755, whatever the umask', async (t) => {
  const base = await tempDir(t);
  const dir = join(base, 'a', 'b', 'run');
  const umask = process.umask(0o000);
  try {
    await prepareRunDir(dir);
  } finally {
    process.umask(umask);
  }
  for (const d of [join(base, 'a'), join(base, 'a', 'b'), dir]) {
    const info = await stat(d);
    assert.equal(info.mode & 0o7777, 0o755, `${d} has mode 0755`);
    assert.equal(info.uid, uid);
  }
  await prepareRunDir(dir);
});

test('a run dir others may write, or another user owns, is refused with the fix in the message', async (t) => {
  const cases: Array<{ what: string; mode: number; owner: number; shown: string }> = [
    { what: 'world-writable', mode: 0o777, owner: uid, shown: '0777' },
    { what: 'world-writable with the sticky bit (like /tmp)', mode: 0o1777, owner: uid, shown: '01777' },
    { what: 'group-writable', mode: 0o775, owner: uid, shown: '0775' },
    { what: 'owned by another user', mode: 0o755, owner: otherUid, shown: '0755' },
  ];
  for (const c of cases) {
    const dir = join(await tempDir(t), 'run');
    await mkdir(dir);
    await chmod(dir, c.mode);
    await chown(dir, c.owner, 0);
    await assert.rejects(prepareRunDir(dir), isCode(codes.runDirUnsafe, dir, `uid ${c.owner}`, c.shown, `chown ${uid} ${dir} && chmod 755 ${dir}`, '--run-dir'), c.what);
  }
});

test('a symlinked run dir is judged by the folder it points to', async (t) => {
  const base = await tempDir(t);
  const good = join(base, 'good');
  const bad = join(base, 'bad');
  await mkdir(good, { mode: 0o755 });
  await mkdir(bad);
  await chmod(bad, 0o777);
  await symlink(good, join(base, 'to-good'));
  await symlink(bad, join(base, 'to-bad'));
  await checkRunDir(join(base, 'to-good'));
  await assert.rejects(checkRunDir(join(base, 'to-bad')), isCode(codes.runDirUnsafe, join(base, 'to-bad'), bad, '0777', `chmod 755 ${bad}`));
  await writeFile(join(base, 'file'), 'x');
  await assert.rejects(prepareRunDir(join(base, 'file')), (err: unknown) => err instanceof ConfigError && err.code === codes.runDirUnsafe);
});

test('readRunDirFile reads a regular file of this user, and refuses anything else, naming the file', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'balancer.json');
  await writeFile(path, 'good', { mode: 0o644 });
  assert.equal((await readRunDirFile(path)).toString(), 'good');
  assert.equal(await readRunDirFileIfExists(path), 'good');
  assert.equal(await readRunDirFileIfExists(join(dir, 'missing')), undefined);
  await assert.rejects(readRunDirFile(join(dir, 'missing')), { code: 'ENOENT' });

  const elsewhere = join(await tempDir(t), 'elsewhere.json');
  await writeFile(elsewhere, 'planted');
  const cases: Array<{ what: string; make: (p: string) => Promise<unknown>; says: string }> = [
    { what: 'a symlink', make: (p) => symlink(elsewhere, p), says: `symbolic link to ${elsewhere}` },
    { what: 'a FIFO', make: (p) => execa('mkfifo', [p]), says: 'named pipe (FIFO); expected a regular file' },
    { what: 'a directory', make: (p) => mkdir(p), says: 'a directory; expected a regular file' },
    { what: "another user's file", make: async (p) => { await writeFile(p, 'x'); await chown(p, otherUid, 0); }, says: `owned by uid ${otherUid}; expected a file owned by uid ${uid}` },
    { what: 'a group-writable file', make: async (p) => { await writeFile(p, 'x'); await chmod(p, 0o664); }, says: 'mode 0664; expected no write permission for group or others' },
    { what: 'a world-writable file', make: async (p) => { await writeFile(p, 'x'); await chmod(p, 0o666); }, says: 'mode 0666' },
  ];
  for (const [i, c] of cases.entries()) {
    const bad = join(dir, `bad-${i}`);
    await c.make(bad);
    const started = Date.now();
    await assert.rejects(readRunDirFile(bad), isCode(codes.runDirFile, bad, c.says), c.what);
    await assert.rejects(readRunDirFileIfExists(bad), isCode(codes.runDirFile, bad), c.what);
    assert.ok(Date.now() - started < 1000, `${c.what}: refused at once, never blocking`);
  }
});

test('readRunDirFile accepts a file root owns, and refuses any file in a folder others may write', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, 'root-owned');
  await chown(path, 0, 0);
  assert.equal((await readRunDirFile(path)).toString(), 'root-owned');
  await chmod(dir, 0o777);
  await assert.rejects(readRunDirFile(path), isCode(codes.runDirUnsafe, dir, '0777'));
});

test('as an unprivileged user: its own dir and files and root-owned files are read, a root-owned dir or another user\'s file is refused', async (t) => {
  if (uid !== 0) return t.skip('needs root to switch to user nobody');
  const base = await tempDir(t);
  await chmod(base, 0o755);
  const dir = join(base, 'run');
  await mkdir(dir, { mode: 0o755 });
  await chown(dir, 65534, 65534);
  await writeFile(join(dir, 'own'), 'own', { mode: 0o644 });
  await chown(join(dir, 'own'), 65534, 65534);
  await writeFile(join(dir, 'root'), 'root', { mode: 0o644 });
  await writeFile(join(dir, 'other'), 'other', { mode: 0o644 });
  await chown(join(dir, 'other'), 1, 1);
  const rootDir = join(base, 'root-dir');
  await mkdir(rootDir, { mode: 0o755 });
  // A clone in a private folder (mktemp -d, /root) is not readable by nobody: run from a readable copy.
  const root = await repoReadableByNobody();
  const script = `
    import { readRunDirFile, checkRunDir } from ${JSON.stringify(join(root, 'agent/fs/run-dir.ts'))};
    const out = {};
    for (const f of ['own', 'root', 'other']) {
      try { out[f] = (await readRunDirFile(${JSON.stringify(dir)} + '/' + f)).toString(); } catch (e) { out[f] = e.code + ' ' + e.message; }
    }
    try { await checkRunDir(${JSON.stringify(rootDir)}); out.rootDir = 'ok'; } catch (e) { out.rootDir = e.code + ' ' + e.message; }
    process.stdout.write(JSON.stringify(out));
  `;
  const result = await execa('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'node', '--import', 'tsx', '--input-type=module', '-e', script], { reject: false, cwd: root });
  assert.equal(result.exitCode, 0, result.stderr);
  const out = JSON.parse(result.stdout) as Record<string, string>;
  assert.equal(out.own, 'own');
  assert.equal(out.root, 'root');
  assert.match(out.other ?? '', /^LM_ERR_RUN_DIR_FILE .*owned by uid 1; expected a file owned by uid 65534/);
  assert.match(out.rootDir ?? '', new RegExp(`^LM_ERR_RUN_DIR_UNSAFE run dir ${rootDir} is owned by uid 0 .*chown 65534 ${rootDir} && chmod 755 ${rootDir}`));
});
