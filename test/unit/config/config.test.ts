import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readConfigFile, readEnv, resolveConfig } from '../../../agent/config/config.js';

test('defaults are sane and documented values', () => {
  const c = resolveConfig();
  assert.equal(c.consul, 'http://127.0.0.1:8500');
  assert.deepEqual(c.dns, { host: '127.0.0.1', port: 8653 });
  assert.deepEqual(c.admin, { host: '127.0.0.1', port: 9190 });
  assert.equal(c.hostsFile, '/etc/hosts');
  assert.equal(c.suffix, 'local');
  assert.equal(c.range.cidr, '127.77.0.0/16');
  assert.equal(c.empty, 'reject');
});

test('layers: file < env < flags, and Consul variables are honoured', () => {
  const env = readEnv({ CONSUL_HTTP_ADDR: '127.0.0.1:18500', CONSUL_HTTP_TOKEN: 'from-env', LOOPMESH_SUFFIX: 'mesh' });
  const c = resolveConfig({ consul: 'http://file:1', suffix: 'file', logLevel: 'debug' }, env, { suffix: 'flag.internal' });
  assert.equal(c.consul, 'http://127.0.0.1:18500');
  assert.equal(c.token, 'from-env');
  assert.equal(c.suffix, 'flag.internal');
  assert.equal(c.logLevel, 'debug');
  assert.equal(resolveConfig({ dns: 'off', admin: 'off', hostsFile: 'off' }).dns, undefined);
});

test('token file is read when no token is given', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-cfg-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'token'), 'secret-token\n');
  assert.equal(resolveConfig({ tokenFile: join(dir, 'token') }).token, 'secret-token');
  assert.throws(() => resolveConfig({ tokenFile: join(dir, 'missing') }), /--token-file: cannot read ".*missing" \(ENOENT\)/);
});

test('every bad value gets a message naming it and what was expected', () => {
  const cases: [Record<string, string>, RegExp][] = [
    [{ consul: 'ftp://x' }, /--consul: expected a URL .* got "ftp:\/\/x"/],
    [{ dns: '127.0.0.1' }, /--dns: expected ADDRESS:PORT .* got "127.0.0.1", or "off"/],
    [{ admin: 'x:99999' }, /--admin: expected ADDRESS:PORT/],
    [{ range: '10.0.0.0/8' }, /--range: expected a CIDR range inside 127.0.0.0\/8.*"10.0.0.0\/8"/],
    [{ suffix: 'bad_suffix!' }, /--suffix: expected a DNS domain .* got "bad_suffix!"/],
    [{ logLevel: 'loud' }, /--log-level: expected one of fatal, .* got "loud"/],
    [{ empty: 'drop' }, /--empty: expected one of reject, keep-last, got "drop"/],
    [{ drainTimeout: '-1' }, /--drain-timeout: expected a number of seconds .* got "-1"/],
    [{ allowWarning: 'maybe' }, /--allow-warning: expected true or false, got "maybe"/],
  ];
  for (const [raw, pattern] of cases) assert.throws(() => resolveConfig(raw), (err: Error & { code?: string }) => pattern.test(err.message) && err.code === 'LM_ERR_CONFIG_INVALID', JSON.stringify(raw));
});

test('config file: JSON with known keys only', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-cfg-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const good = join(dir, 'good.json');
  await writeFile(good, JSON.stringify({ consul: 'http://127.0.0.1:1', services: ['web', 'redis'], allowWarning: true, drainTimeout: 5 }));
  const c = resolveConfig(readConfigFile(good));
  assert.deepEqual(c.services, ['web', 'redis']);
  assert.equal(c.allowWarning, true);
  assert.equal(c.drainTimeoutMs, 5000);
  const unknown = join(dir, 'unknown.json');
  await writeFile(unknown, '{"colour": "blue"}');
  assert.throws(() => readConfigFile(unknown), /unknown key "colour"; expected one of consul, /);
  const broken = join(dir, 'broken.json');
  await writeFile(broken, '{"consul": ');
  assert.throws(() => readConfigFile(broken), /broken.json: expected JSON/);
  assert.throws(() => readConfigFile(join(dir, 'nope.json')), /cannot read it \(ENOENT\)/);
});
