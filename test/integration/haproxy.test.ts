import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { renderAll } from '../../agent/render/render.js';
import { builtinTemplatesDir, loadTemplates } from '../../agent/render/templates.js';
import type { Route } from '../../agent/plan/plan.js';
import { eventually, freePort, startIdServer, whoAnswers } from '../support/net.js';

test('the rendered haproxy.cfg is accepted by a real HAProxy and routes to the backends', { timeout: 30_000 }, async (t) => {
  const which = await execa('sh', ['-c', 'command -v haproxy'], { reject: false });
  if (which.exitCode !== 0) return t.skip('haproxy is not installed (npm test installs it with apt-get)');
  const dir = await mkdtemp(join(tmpdir(), 'lm-haproxy-'));
  const a = await startIdServer('h-a');
  const b = await startIdServer('h-b');
  const port = await freePort();
  const routes: Route[] = [
    { service: 'web', name: 'web', fqdn: 'web.local', address: '127.79.0.1', port, policy: 'round-robin', empty: 'reject', split: [], limits: {}, outlier: {}, gateways: [], backends: [{ id: 'n/a', address: '127.0.0.1', port: a.port, weight: 1, subset: '' }, { id: 'n/b', address: '127.0.0.1', port: b.port, weight: 1, subset: '' }] },
    { service: 'idle', name: 'idle', fqdn: 'idle.local', address: '127.79.0.2', port, policy: 'p2c-ewma', empty: 'reject', split: [], limits: {}, outlier: {}, gateways: [], backends: [] },
  ];
  const { templates } = await loadTemplates([builtinTemplatesDir()]);
  const cfg = renderAll(templates, { routes, suffix: 'local' }).files.find((f) => f.output === 'haproxy.cfg');
  assert.ok(cfg);
  const file = join(dir, 'haproxy.cfg');
  await writeFile(file, cfg.text);
  const check = await execa('haproxy', ['-c', '-f', file], { reject: false, all: true });
  assert.equal(check.exitCode, 0, check.all);
  const proc = execa('haproxy', ['-db', '-f', file], { reject: false });
  t.after(async () => {
    proc.kill('SIGKILL');
    await proc;
    await Promise.all([a.close(), b.close()]);
    await rm(dir, { recursive: true, force: true });
  });
  await eventually(() => whoAnswers('127.79.0.1', port).catch(() => undefined), 5000, 'haproxy listening');
  const seen = new Set<string>();
  for (let i = 0; i < 6; i += 1) seen.add(await whoAnswers('127.79.0.1', port));
  assert.deepEqual(seen, new Set(['h-a', 'h-b']));
});
