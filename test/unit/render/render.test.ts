import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseBalancerConfig } from '../../../agent/contract/balancer-config.js';
import { writeFileAtomic } from '../../../agent/fs/atomic-write.js';
import { renderAll, writeRendered } from '../../../agent/render/render.js';
import { builtinTemplatesDir, compileTemplate, loadTemplates } from '../../../agent/render/templates.js';
import type { Route } from '../../../agent/plan/plan.js';

const routes: Route[] = [
  { service: 'web', name: 'web', fqdn: 'web.local', address: '127.77.0.2', port: 80, policy: 'round-robin', empty: 'reject', split: [], limits: {}, outlier: {}, gateways: [], backends: [{ id: 'n1/w1', address: '10.0.0.1', port: 8080, weight: 1, subset: '' }, { id: 'n2/w"2', address: '10.0.0.2', port: 8080, weight: 1, subset: '' }] },
  { service: 'redis', name: 'redis', fqdn: 'redis.local', address: '127.77.0.3', port: 6379, policy: 'round-robin', empty: 'keep-last', split: [], limits: {}, outlier: {}, gateways: [], backends: [] },
];

test('the built-in templates render a balancer.json that loads back to the same routes, and a hosts block', async () => {
  const { templates, errors } = await loadTemplates([builtinTemplatesDir()]);
  assert.deepEqual(errors, []);
  const { files, errors: renderErrors } = renderAll(templates, { routes, suffix: 'local' });
  assert.deepEqual(renderErrors, []);
  const balancer = files.find((f) => f.output === 'balancer.json');
  assert.deepEqual(parseBalancerConfig(balancer?.text ?? '').services, routes, 'JSON-special characters survive (noEscape + json helper)');
  assert.equal(files.find((f) => f.output === 'hosts')?.text, '127.77.0.2 web.local\n127.77.0.3 redis.local\n');
  assert.match(files.find((f) => f.output === 'haproxy.cfg')?.text ?? '', /bind 127\.77\.0\.2:80[\s\S]*server s1 10\.0\.0\.2:8080/);
});

test('a template error names file and line; the other templates still render', () => {
  assert.throws(() => compileTemplate('/t/bad.hbs', 'line1\n{{#each routes}}\n{{/if}}\n', 'bad'), (err: Error & { code?: string }) => err.code === 'LM_ERR_RENDER_TEMPLATE' && /^\/t\/bad\.hbs:\d+: /.test(err.message));
  const missing = compileTemplate('/t/strict.hbs', 'ok\n{{#each routes}}{{nosuchfield}}{{/each}}\n', 'strict');
  const good = compileTemplate('/t/good.hbs', '{{#each routes}}{{name}} {{/each}}', 'good');
  const r = renderAll([missing, good], { routes, suffix: 'local' });
  assert.deepEqual(r.failed, ['strict']);
  assert.match(r.errors[0]?.message ?? '', /^\/t\/strict\.hbs:2: "nosuchfield" not defined/);
  assert.deepEqual(r.files, [{ output: 'good', text: 'web redis ' }]);
});

test('a balancer.json template that renders something the balancer cannot load is refused', () => {
  const bad = compileTemplate('/t/balancer.json.hbs', '{"version": 1, "services": [{"service": "x"}]}', 'balancer.json');
  const r = renderAll([bad], { routes, suffix: 'local' });
  assert.deepEqual(r.failed, ['balancer.json']);
  assert.match(r.errors[0]?.message ?? '', /does not load: .*services\[0\]\.address: expected a string, got nothing/);
});

test('a user folder overrides a built-in template by name and adds its own', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-tpl-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'hosts.hbs'), '{{#each routes}}{{address}} {{fqdn}} # mine\n{{/each}}');
  await writeFile(join(dir, 'names.txt.hbs'), '{{#each routes}}{{fqdn}}:{{port}}\n{{/each}}');
  const { templates } = await loadTemplates([builtinTemplatesDir(), dir]);
  const files = renderAll(templates, { routes, suffix: 'local' }).files;
  assert.equal(files.find((f) => f.output === 'hosts')?.text, '127.77.0.2 web.local # mine\n127.77.0.3 redis.local # mine\n');
  assert.equal(files.find((f) => f.output === 'names.txt')?.text, 'web.local:80\nredis.local:6379\n');
});

test('writes are atomic, only on change, and keep the file mode', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-write-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const first = await writeRendered(dir, [{ output: 'hosts', text: 'a\n' }, { output: 'balancer.json', text: '{}' }]);
  assert.deepEqual(first.changed, ['hosts', 'balancer.json']);
  await chmod(join(dir, 'hosts'), 0o640);
  const before = await stat(join(dir, 'hosts'));
  const second = await writeRendered(dir, [{ output: 'hosts', text: 'a\n' }]);
  assert.deepEqual(second.changed, [], 'same content: nothing written');
  assert.equal((await stat(join(dir, 'hosts'))).ino, before.ino);
  assert.equal(await writeFileAtomic(join(dir, 'hosts'), 'b\n'), true);
  const after = await stat(join(dir, 'hosts'));
  assert.notEqual(after.ino, before.ino, 'replaced by rename, not rewritten in place');
  assert.equal(after.mode & 0o777, 0o640);
  assert.equal(await readFile(join(dir, 'hosts'), 'utf8'), 'b\n');
  const failed = await writeRendered(join(dir, 'missing-dir'), [{ output: 'x', text: 'y' }]);
  assert.equal(failed.errors[0]?.code, 'LM_ERR_RENDER_WRITE');
});

test('balancer.json is written last, so a balancer process that reloads on it finds the hosts lines already in place', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-order-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const files = [
    { output: 'balancer.json', text: '{"version":1,"services":[]}' },
    { output: 'hosts', text: '127.77.0.2 web.local\n' },
    { output: 'haproxy.cfg', text: 'global\n' },
  ];
  const { changed, errors } = await writeRendered(dir, files);
  assert.deepEqual(errors, []);
  assert.equal(changed.at(-1), 'balancer.json', 'balancer.json is written once the others are in place');
  assert.deepEqual(changed.slice(0, -1).sort(), ['haproxy.cfg', 'hosts'], 'the others are written (side by side) before it');
  const mtime = async (name: string): Promise<bigint> => (await stat(join(dir, name), { bigint: true })).mtimeNs;
  const last = await mtime('balancer.json');
  assert.ok(last >= (await mtime('hosts')) && last >= (await mtime('haproxy.cfg')), 'balancer.json has the newest mtime');
});
