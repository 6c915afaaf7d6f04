import { mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import type { BalancerConfig } from '../../../agent/balancer/config.js';
import { BalancerFileSource } from '../../../agent/balancer/file-source.js';
import { silentLogger } from '../../../agent/log.js';
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
