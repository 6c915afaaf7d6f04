import { mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { writeFileAtomic } from '../../../agent/fs/atomic-write.js';

async function tempFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((f) => f.endsWith('.tmp'));
}

test('on a full disk the write fails with ENOSPC, leaves no temp file and the old file intact; with space again it succeeds', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-full-disk-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const mounted = await execa('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', dir], { reject: false });
  if (mounted.exitCode !== 0) return t.skip(`cannot mount a tmpfs here: ${mounted.stderr}`);
  try {
    const path = join(dir, 'balancer.json');
    const old = '{"version":1,"services":[]}\n';
    await writeFileAtomic(path, old);
    // Fill what is left: the filler's write stops with ENOSPC, keeping what fit.
    await writeFile(join(dir, 'filler'), Buffer.alloc(128 * 1024, 1)).catch((err: NodeJS.ErrnoException) => assert.equal(err.code, 'ENOSPC'));
    const content = `${'x'.repeat(16 * 1024)}\n`;

    for (let i = 0; i < 3; i++) {
      await assert.rejects(writeFileAtomic(path, content), (err: NodeJS.ErrnoException) => {
        assert.equal(err.code, 'ENOSPC');
        assert.match(err.message, /no space left on device/);
        return true;
      });
      assert.deepEqual(await tempFiles(dir), [], 'no temp file left after a failed write');
    }
    assert.equal(await readFile(path, 'utf8'), old, 'the old file is untouched');

    await rm(join(dir, 'filler'));
    assert.equal(await writeFileAtomic(path, content), true);
    assert.equal(await readFile(path, 'utf8'), content);
    assert.equal((await stat(path)).mode & 0o777, 0o644);
    assert.deepEqual(await tempFiles(dir), []);
  } finally {
    await execa('umount', [dir]);
  }
});

test('a failed rename removes the temp file too', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-atomic-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'hosts');
  await writeFile(path, 'old');
  // An immutable file cannot be replaced, even by root: the rename fails (EPERM) after the temp file is written.
  const immutable = await execa('chattr', ['+i', path], { reject: false });
  if (immutable.exitCode !== 0) return t.skip(`chattr +i does not work here: ${immutable.stderr}`);
  try {
    await assert.rejects(writeFileAtomic(path, 'new'), { code: 'EPERM' });
    assert.deepEqual(await tempFiles(dir), []);
    assert.equal(await readFile(path, 'utf8'), 'old');
  } finally {
    await execa('chattr', ['-i', path]);
  }
});

test('unchanged content writes nothing; changed content keeps the old mode', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-atomic-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'addresses.json');
  assert.equal(await writeFileAtomic(path, 'a', { mode: 0o600 }), true);
  assert.equal(await writeFileAtomic(path, 'a'), false);
  assert.equal(await writeFileAtomic(path, 'b'), true);
  assert.equal((await stat(path)).mode & 0o777, 0o600);
  assert.equal(await readFile(path, 'utf8'), 'b');
});

test('a file this process wrote is not read back to see it is unchanged, but any change by someone else (same size, in place) is seen and undone', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-atomic-memo-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'balancer.json');
  assert.equal(await writeFileAtomic(path, 'version one\n'), true);
  assert.equal(await writeFileAtomic(path, 'version one\n'), false, 'unchanged: nothing written');
  // Same size, written in place (no rename): only the change time tells (a later clock tick than ours).
  await new Promise((r) => setTimeout(r, 30));
  await writeFile(path, 'VERSION ONE\n');
  assert.equal(await writeFileAtomic(path, 'version one\n'), true, 'the outside edit is undone');
  assert.equal(await readFile(path, 'utf8'), 'version one\n');
  // Replaced by rename with the same content: read once, found equal, nothing written.
  await writeFile(join(dir, 'other'), 'version one\n');
  await rename(join(dir, 'other'), path);
  assert.equal(await writeFileAtomic(path, 'version one\n'), false);
});
