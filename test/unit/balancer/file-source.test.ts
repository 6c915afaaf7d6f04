import { chmod, chown, mkdir, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import type { BalancerConfig } from '../../../agent/contract/balancer-config.js';
import { BalancerFileSource } from '../../../agent/balancer/file-source.js';
import { writeFileAtomic } from '../../../agent/fs/atomic-write.js';
import { codes } from '../../../agent/errors.js';
import { silentLogger } from '../../../agent/log.js';
import { captureLogger } from '../../support/log.js';
import { config, service, waitUntil } from './tcp.js';

const backend = { id: 'node1/web-1', address: '10.0.0.1', port: 8080 };

function text(port: number): string {
  return `${JSON.stringify(config(service('web', '127.66.1.1', port, [backend])), null, 2)}\n`;
}

let tempCounter = 0;
/** The renderer's way: a temp file in the same folder, then rename over. */
async function replaceFile(path: string, content: string): Promise<void> {
  const temp = `${path}.${process.pid}.${tempCounter++}.tmp`;
  await writeFile(temp, content);
  await rename(temp, path);
}

async function setup(t: TestContext, initial?: string) {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-balancer-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'balancer.json');
  if (initial !== undefined) await writeFile(path, initial);
  const received: BalancerConfig[] = [];
  const source = new BalancerFileSource({ path, logger: silentLogger(), onConfig: (c) => void received.push(c) });
  t.after(() => source.close());
  return { path, received, source };
}

function ports(configs: BalancerConfig[]): number[] {
  return configs.map((c) => c.services[0]?.port ?? 0);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

test('loads the file at start, then picks up a rename-replaced file by itself', async (t) => {
  const { path, received, source } = await setup(t, text(1001));
  await source.start();
  assert.deepEqual(ports(received), [1001]);
  assert.equal(source.current()?.services[0]?.backends[0]?.id, 'node1/web-1');

  await replaceFile(path, text(1002));
  await waitUntil(() => received.length === 2, 'the replaced file to be applied', 5000);
  assert.deepEqual(ports(received), [1001, 1002]);
  assert.equal(source.current()?.services[0]?.port, 1002);

  // Right after the previous one: the watcher throttles such close changes, the source must not miss it.
  await replaceFile(path, text(1003));
  await waitUntil(() => received.length === 3, 'a second replacement to be applied', 5000);
  assert.deepEqual(ports(received), [1001, 1002, 1003]);
});

test('a file that appears after start, or is written in place, is picked up', async (t) => {
  const { path, received, source } = await setup(t);
  await source.start();
  assert.equal(source.current(), undefined);
  assert.deepEqual(received, []);

  await replaceFile(path, text(2001));
  await waitUntil(() => received.length === 1, 'the new file to be applied', 5000);
  await writeFile(path, text(2002));
  await waitUntil(() => received.length === 2, 'the in-place write to be applied', 5000);
  assert.deepEqual(ports(received), [2001, 2002]);
});

test('an invalid file keeps the previous config and does not call onConfig', async (t) => {
  const { path, received, source } = await setup(t, text(3001));
  await source.start();

  await replaceFile(path, '{ "version": 1, "services": [');
  await source.reload();
  await sleep(400);
  assert.deepEqual(ports(received), [3001]);
  assert.equal(source.current()?.services[0]?.port, 3001);

  await replaceFile(path, JSON.stringify({ version: 1, services: [{ service: 'web', address: 'not-an-ip' }] }));
  await source.reload();
  await sleep(400);
  assert.deepEqual(ports(received), [3001]);

  await replaceFile(path, text(3002));
  await source.reload();
  assert.deepEqual(ports(received), [3001, 3002]);
});

test('identical content does not call onConfig again', async (t) => {
  const { path, received, source } = await setup(t, text(4001));
  await source.start();
  await replaceFile(path, text(4001));
  await source.reload();
  await sleep(400);
  assert.equal(received.length, 1);

  // Back to the last good content after an invalid file: still the config in service, so no call.
  await replaceFile(path, 'not json');
  await source.reload();
  await replaceFile(path, text(4001));
  await source.reload();
  await sleep(400);
  assert.equal(received.length, 1);
});

test('a config whose apply fails is offered again on the next reload', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-balancer-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'balancer.json');
  await writeFile(path, text(5001));
  let calls = 0;
  const source = new BalancerFileSource({
    path,
    logger: silentLogger(),
    onConfig: () => {
      calls++;
      if (calls === 1) throw new Error('apply failed');
    },
  });
  t.after(() => source.close());
  await source.reload();
  assert.equal(calls, 1);
  assert.equal(source.current(), undefined);
  await source.reload();
  assert.equal(calls, 2);
  assert.equal(source.current()?.services[0]?.port, 5001);
  await source.reload();
  assert.equal(calls, 2, 'applied content is not offered again');
});

test('a run dir that does not exist yet is created, and a file rendered into it later is picked up', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-balancer-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'run', 'not-yet', 'balancer.json');
  const received: BalancerConfig[] = [];
  const source = new BalancerFileSource({ path, logger: silentLogger(), onConfig: (c) => void received.push(c) });
  t.after(() => source.close());
  await source.start();
  assert.deepEqual(received, []);
  await replaceFile(path, text(7001));
  await waitUntil(() => received.length === 1, 'the file rendered after start');
  assert.deepEqual(ports(received), [7001]);
});

/** A source that checks its folder every 100 ms, with its log kept. */
async function followed(t: TestContext) {
  const base = await mkdtemp(join(tmpdir(), 'loopmesh-balancer-'));
  t.after(() => rm(base, { recursive: true, force: true }));
  const dir = join(base, 'run');
  const path = join(dir, 'balancer.json');
  const received: BalancerConfig[] = [];
  const log = captureLogger('info');
  const source = new BalancerFileSource({ path, logger: log.logger, onConfig: (c) => void received.push(c), dirCheckMs: 100 });
  t.after(() => source.close());
  return { base, dir, path, received, source, log };
}

test('a run dir deleted and recreated is followed again', async (t) => {
  const { dir, path, received, source, log } = await followed(t);
  await source.start();
  await replaceFile(path, text(8001));
  await waitUntil(() => received.length === 1, 'the first file');

  await rm(dir, { recursive: true });
  await waitUntil(() => log.lines.some((l) => l.msg.startsWith('run dir removed')), 'the removal to be noticed', 5000);
  assert.equal(source.current()?.services[0]?.port, 8001, 'the last good config stays in service while the dir is gone');

  await mkdir(dir, { mode: 0o755 });
  await replaceFile(path, text(8002));
  await waitUntil(() => received.length === 2, 'the file in the recreated dir', 5000);
  // Not just the one read after the dir came back: later changes are seen too (the watcher follows the new dir).
  await sleep(300);
  await writeFile(path, text(8003));
  await waitUntil(() => received.length === 3, 'a later change in the recreated dir', 5000);
  assert.deepEqual(ports(received), [8001, 8002, 8003]);
});

test('a run dir deleted and recreated at once (the freed inode number comes back) is followed again', async (t) => {
  const { dir, path, received, source } = await followed(t);
  await source.start();
  await replaceFile(path, text(8101));
  await waitUntil(() => received.length === 1, 'the first file');
  for (const port of [8102, 8103, 8104]) {
    await rm(dir, { recursive: true });
    await mkdir(dir, { mode: 0o755 });
    await replaceFile(path, text(port));
    await waitUntil(() => source.current()?.services[0]?.port === port, `the file in the recreated dir (${port})`, 5000);
    // The watcher must follow the new folder: an in-place write, with no folder change, is seen.
    await sleep(300);
    await writeFile(path, text(port + 100));
    await waitUntil(() => source.current()?.services[0]?.port === port + 100, `an in-place write in the recreated dir (${port + 100})`, 5000);
  }
});

test('a run dir replaced by a rename is followed: the new folder, not the old one', async (t) => {
  const { base, dir, path, received, source, log } = await followed(t);
  await source.start();
  await replaceFile(path, text(9001));
  await waitUntil(() => received.length === 1, 'the first file');

  // Like a deploy that prepares a new dir and swaps it in.
  const next = join(base, 'run.new');
  await mkdir(next, { mode: 0o755 });
  await writeFile(join(next, 'balancer.json'), text(9002));
  await rename(dir, join(base, 'run.old'));
  await rename(next, dir);
  await waitUntil(() => received.length === 2, 'the swapped-in dir', 5000);
  assert.ok(log.lines.some((l) => l.msg.startsWith('run dir recreated or replaced')));

  await sleep(300);
  await writeFile(join(base, 'run.old', 'balancer.json'), text(9999));
  await replaceFile(path, text(9003));
  await waitUntil(() => received.length === 3, 'a change in the new dir', 5000);
  await sleep(300);
  assert.deepEqual(ports(received), [9001, 9002, 9003], 'the old, renamed-away folder is no longer followed');
});

test('a recreated run dir that others may write is not trusted: its file is refused', async (t) => {
  const { dir, path, received, source, log } = await followed(t);
  await source.start();
  await replaceFile(path, text(9101));
  await waitUntil(() => received.length === 1, 'the first file');
  await rm(dir, { recursive: true });
  await mkdir(dir);
  await chmod(dir, 0o777);
  await writeFile(path, text(9102));
  await waitUntil(() => log.lines.some((l) => l.code === codes.runDirUnsafe), 'the unsafe dir to be reported', 5000);
  assert.match(log.text(), /run dir .* is owned by uid \d+ with mode 0777.*chmod 755/);
  await sleep(300);
  assert.deepEqual(ports(received), [9101], 'nothing from the unsafe dir was applied');
  // Fixing the permissions is enough: the file already there is read again, without a new render.
  await chmod(dir, 0o755);
  await waitUntil(() => received.length === 2, 'the file once the dir is safe', 5000);
  assert.deepEqual(ports(received), [9101, 9102]);
});

test('a balancer.json that is a symlink, a FIFO, another user\'s, or others may write is refused; the last good stays', async (t) => {
  const { base, path, received, source, log } = await followed(t);
  await source.start();
  await replaceFile(path, text(9201));
  await waitUntil(() => received.length === 1, 'the first file');
  const planted = join(base, 'planted.json');
  await writeFile(planted, text(9666));
  const otherUid = process.getuid?.() === 65534 ? 1 : 65534;
  const cases: Array<{ what: string; make: () => Promise<unknown>; says: RegExp }> = [
    { what: 'a symlink', make: () => symlink(planted, path), says: /is a symbolic link to .*planted\.json; expected a regular file/ },
    { what: 'a FIFO', make: () => execa('mkfifo', [path]), says: /is a named pipe \(FIFO\); expected a regular file/ },
    { what: "another user's file", make: async () => { await writeFile(path, text(9667)); await chown(path, otherUid, 0); }, says: new RegExp(`is owned by uid ${otherUid}`) },
    { what: 'a world-writable file', make: async () => { await writeFile(path, text(9668)); await chmod(path, 0o666); }, says: /has mode 0666; expected no write permission for group or others/ },
  ];
  for (const c of cases) {
    await rm(path, { force: true });
    await c.make();
    await source.reload();
    await waitUntil(() => log.lines.some((l) => l.code === codes.runDirFile && c.says.test(String(l.err))), `${c.what} to be refused`, 5000);
    assert.deepEqual(ports(received), [9201], `${c.what}: nothing applied`);
    assert.equal(source.current()?.services[0]?.port, 9201, `${c.what}: the last good config stays`);
  }
  await rm(path, { force: true });
  await replaceFile(path, text(9202));
  await waitUntil(() => received.length === 2, 'a good file again', 5000);
  assert.deepEqual(ports(received), [9201, 9202]);
});

test('start refuses a run dir others may write', async (t) => {
  const { dir, source } = await followed(t);
  await mkdir(dir);
  await chmod(dir, 0o777);
  await assert.rejects(source.start(), { code: codes.runDirUnsafe });
});

test('a config the in-process renderer just wrote and parsed is applied as given, and the same file read later changes nothing', async (t) => {
  const { path, received, source } = await setup(t, text(1001));
  await source.start();
  const written = text(1004);
  await replaceFile(path, written);
  const parsed = JSON.parse(written) as BalancerConfig;
  await source.reload({ text: written, config: parsed });
  assert.equal(received.at(-1), parsed, 'the very object handed in: not read and parsed again');
  const count = received.length;
  // The watcher's own event for that write reads the file: same bytes, so nothing is applied twice.
  await sleep(400);
  await source.reload();
  assert.equal(received.length, count);
  assert.deepEqual(ports(received).slice(-1), [1004]);
});

test('served before it is written: the file this process wrote last (older) is not read back, another writer\'s file is', async (t) => {
  const { path, received, source } = await setup(t);
  await source.start();
  // The renderer's cycle: X-1 handed in, then written; X handed in while the file still holds X-1.
  const older = text(1005);
  await source.reload({ text: older, config: JSON.parse(older) as BalancerConfig });
  assert.equal(await writeFileAtomic(path, older), true);
  const newer = text(1006);
  await source.reload({ text: newer, config: JSON.parse(newer) as BalancerConfig });
  // The watcher's event for the write of X-1 and a read meanwhile: X-1 must not come back.
  await sleep(400);
  await source.reload();
  assert.deepEqual(ports(received), [1005, 1006], 'the older file this process wrote is never applied over the newer config');
  assert.equal(source.current()?.services[0]?.port, 1006);
  // Another writer (an operator) replaces the file: a new inode, read and applied as before.
  await replaceFile(path, text(1007));
  await waitUntil(() => source.current()?.services[0]?.port === 1007, 'another writer\'s file to be applied', 5000);
});
