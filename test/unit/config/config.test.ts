import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isLoopbackHost, readConfigFile, readEnv, resolveConfig } from '../../../agent/config/config.js';
import { makeCerts } from '../../support/consul.js';

test('defaults are sane and documented values', () => {
  const c = resolveConfig();
  assert.equal(c.consul, 'http://127.0.0.1:8500');
  assert.deepEqual(c.dns, { host: '127.0.0.1', port: 8653 });
  assert.deepEqual(c.admin, { host: '127.0.0.1', port: 9190 });
  assert.equal(c.hostsFile, '/etc/hosts');
  assert.equal(c.suffix, 'local');
  assert.equal(c.range.cidr, '127.77.0.0/16');
  assert.equal(c.empty, 'reject');
  assert.equal(c.consulWaitMs, 60_000);
  assert.equal(resolveConfig(readEnv({ LOOPMESH_CONSUL_WAIT: '3' })).consulWaitMs, 3000);
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
    [{ handoverTimeout: '0' }, /--handover-timeout: expected a number of seconds from 1 to 600, got "0"/],
    [{ handoverTimeout: '601' }, /--handover-timeout: expected a number of seconds from 1 to 600, got "601"/],
    [{ handoverTimeout: 'slow' }, /--handover-timeout: expected a number of seconds from 1 to 600, got "slow"/],
    [{ allowWarning: 'maybe' }, /--allow-warning: expected true or false, got "maybe"/],
    [{ consulWait: '0' }, /--consul-wait: expected a whole number of seconds from 1 to 600 .* got "0"/],
    [{ consulWait: '601' }, /--consul-wait: expected a whole number of seconds from 1 to 600 .* got "601"/],
    [{ maxWatches: '181' }, /--max-watches: expected a whole number from 0 to 180 .* got "181"/],
    [{ maxWatches: '-1' }, /--max-watches: expected a whole number from 0 to 180 .* got "-1"/],
    [{ maxWatches: 'many' }, /--max-watches: .* got "many"/],
    [{ servicesKv: '/abs/key' }, /--services-kv: expected a Consul KV key .* got "\/abs\/key"/],
    [{ servicesKv: 'a/../b' }, /--services-kv: expected a Consul KV key .* got "a\/..\/b"/],
    [{ servicesKv: 'a b' }, /--services-kv: expected a Consul KV key .* got "a b"/],
    [{ servicesKv: 'loopmesh/services', services: 'web' }, /--services-kv and --services both name the services to route/],
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
  assert.equal(c.handoverTimeoutMs, 15_000, 'the hot restart waits 15 s for its successor by default');
  const unknown = join(dir, 'unknown.json');
  await writeFile(unknown, '{"colour": "blue"}');
  assert.throws(() => readConfigFile(unknown), /unknown key "colour"; expected one of consul, /);
  const broken = join(dir, 'broken.json');
  await writeFile(broken, '{"consul": ');
  assert.throws(() => readConfigFile(broken), /broken.json: expected JSON/);
  assert.throws(() => readConfigFile(join(dir, 'nope.json')), /cannot read it \(ENOENT\)/);
});

test('Consul address: http:// unless a scheme or --consul-ssl (CONSUL_HTTP_SSL) says https', () => {
  assert.equal(resolveConfig().consulTls, undefined);
  assert.equal(resolveConfig(readEnv({ CONSUL_HTTP_ADDR: '127.0.0.1:8501', CONSUL_HTTP_SSL: 'true' })).consul, 'https://127.0.0.1:8501');
  assert.equal(resolveConfig(readEnv({ CONSUL_HTTP_SSL: 'TRUE' })).consul, 'https://127.0.0.1:8500');
  assert.equal(resolveConfig(readEnv({ CONSUL_HTTP_SSL: 'false' })).consul, 'http://127.0.0.1:8500');
  assert.equal(resolveConfig({ consul: 'https://consul.example:8501' }).consul, 'https://consul.example:8501');
  // https with no TLS files trusts the system's CAs.
  assert.deepEqual(resolveConfig({ consul: 'https://consul.example:8501' }).consulTls, { caFile: undefined, ca: undefined, certFile: undefined, cert: undefined, keyFile: undefined, key: undefined, serverName: undefined });
  assert.throws(() => resolveConfig({ consul: 'http://127.0.0.1:8500', consulSsl: 'true' }), /--consul-ssl \(CONSUL_HTTP_SSL\) is true but --consul "http:\/\/127\.0\.0\.1:8500" says http:\/\//);
  assert.throws(() => resolveConfig({ consulSsl: 'sometimes' }), /--consul-ssl: expected true or false, got "sometimes"/);
});

test('TLS files from Consul\'s own variables, read and checked at start-up', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-cfg-tls-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const certs = await makeCerts(dir);
  const env = readEnv({ CONSUL_HTTP_ADDR: 'https://127.0.0.1:8501', CONSUL_CACERT: certs.ca, CONSUL_CLIENT_CERT: certs.clientCert, CONSUL_CLIENT_KEY: certs.clientKey, CONSUL_TLS_SERVER_NAME: 'server.dc1.consul' });
  const tls = resolveConfig(env).consulTls;
  assert.equal(tls?.caFile, certs.ca);
  assert.equal(tls?.ca, await readFile(certs.ca, 'utf8'));
  assert.equal(tls?.cert, await readFile(certs.clientCert, 'utf8'));
  assert.equal(tls?.key, await readFile(certs.clientKey, 'utf8'));
  assert.equal(tls?.serverName, 'server.dc1.consul');
  // LOOPMESH_* beat CONSUL_*, flags beat both.
  const mine = readEnv({ LOOPMESH_TLS_SERVER_NAME: 'localhost', CONSUL_TLS_SERVER_NAME: 'server.dc1.consul', CONSUL_HTTP_ADDR: 'https://127.0.0.1:8501' });
  assert.equal(resolveConfig(mine).consulTls?.serverName, 'localhost');
  assert.equal(resolveConfig(mine, { tlsServerName: 'server.dc1.consul' }).consulTls?.serverName, 'server.dc1.consul');

  const notPem = join(dir, 'not.pem');
  await writeFile(notPem, 'hello\n');
  const https = { consul: 'https://127.0.0.1:8501' };
  const cases: [Record<string, string>, RegExp][] = [
    [{ consul: 'http://127.0.0.1:8500', caFile: certs.ca }, /^--ca-file \(CONSUL_CACERT\) is set but --consul "http:\/\/127\.0\.0\.1:8500" is plain HTTP; expected an https:\/\/ address, or --consul-ssl/],
    [{ consul: '127.0.0.1:8500', clientCert: certs.clientCert, clientKey: certs.clientKey }, /^--client-cert \(CONSUL_CLIENT_CERT\), --client-key \(CONSUL_CLIENT_KEY\) are set but --consul "127\.0\.0\.1:8500" is plain HTTP/],
    [{ tlsServerName: 'server.dc1.consul' }, /^--tls-server-name \(CONSUL_TLS_SERVER_NAME\) is set but --consul "127\.0\.0\.1:8500" is plain HTTP/],
    [{ ...https, caFile: join(dir, 'missing.pem') }, /^--ca-file: cannot read ".*missing\.pem" \(ENOENT\); expected a readable PEM file of certificates$/],
    [{ ...https, caFile: dir }, /^--ca-file: cannot read ".*lm-cfg-tls-\w+" \(EISDIR\)/],
    [{ ...https, caFile: notPem }, /^--ca-file: ".*not\.pem" holds no PEM certificate; expected "-----BEGIN CERTIFICATE-----" blocks$/],
    [{ ...https, clientCert: certs.clientCert }, /^--client-cert ".*dc1-client-consul-0\.pem" is set without --client-key; expected both/],
    [{ ...https, clientKey: certs.clientKey }, /^--client-key ".*dc1-client-consul-0-key\.pem" is set without --client-cert; expected both/],
    [{ ...https, clientCert: certs.clientCert, clientKey: join(dir, 'nokey.pem') }, /^--client-key: cannot read ".*nokey\.pem" \(ENOENT\)/],
    [{ ...https, clientCert: certs.clientCert, clientKey: certs.ca }, /^--client-key: ".*consul-agent-ca\.pem" holds no usable private key/],
    [{ ...https, clientCert: certs.clientCert, clientKey: certs.serverKey }, /^--client-key: ".*dc1-server-consul-0-key\.pem" is not the key of --client-cert ".*dc1-client-consul-0\.pem"/],
    [{ ...https, tlsServerName: 'bad name!' }, /^--tls-server-name: expected a DNS name such as server\.dc1\.consul, got "bad name!"$/],
  ];
  for (const [raw, pattern] of cases) {
    assert.throws(() => resolveConfig(raw), (err: Error & { code?: string }) => pattern.test(err.message) && err.code === 'LM_ERR_CONFIG_INVALID', `${JSON.stringify(raw)}`);
  }
});

test('token: the latest layer that sets a token or its file decides; in one layer the file wins; an empty file is refused', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-cfg-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'token');
  await writeFile(file, '  from-file \n');
  const env = readEnv({ CONSUL_HTTP_TOKEN: 'from-env' });
  assert.deepEqual(pick(resolveConfig(env, { tokenFile: file })), { token: 'from-file', tokenFile: file });
  assert.deepEqual(pick(resolveConfig({ tokenFile: file }, env)), { token: 'from-env', tokenFile: undefined });
  assert.deepEqual(pick(resolveConfig(readEnv({ CONSUL_HTTP_TOKEN: 'from-env', CONSUL_HTTP_TOKEN_FILE: file }))), { token: 'from-file', tokenFile: file });
  assert.deepEqual(pick(resolveConfig({ token: 'from-flag' })), { token: 'from-flag', tokenFile: undefined });
  assert.deepEqual(pick(resolveConfig()), { token: undefined, tokenFile: undefined });
  const empty = join(dir, 'empty');
  await writeFile(empty, '\n');
  assert.throws(() => resolveConfig({ tokenFile: empty }), /^ConfigError: --token-file: ".*empty" is empty; expected a file holding a Consul ACL token$/);
});

function pick(c: { token: string | undefined; tokenFile: string | undefined }): { token: string | undefined; tokenFile: string | undefined } {
  return { token: c.token, tokenFile: c.tokenFile };
}

test('admin outside loopback only with --admin-public', () => {
  for (const admin of ['127.0.0.1:9190', '127.9.9.9:9190', 'localhost:9190', '[::1]:9190']) assert.equal(resolveConfig({ admin }).admin?.port, 9190, admin);
  for (const admin of ['0.0.0.0:9190', '[::]:9190', '192.168.1.20:9190', '[fe80::1]:9190']) {
    assert.throws(
      () => resolveConfig({ admin }),
      (err: Error & { code?: string }) => err.code === 'LM_ERR_CONFIG_INVALID' && err.message.includes(`--admin: "${admin}" is not a loopback address`) && err.message.includes('--admin-public'),
      admin,
    );
    const c = resolveConfig({ admin, adminPublic: 'true' });
    assert.equal(c.adminPublic, true);
    assert.equal(c.admin?.port, 9190);
  }
  assert.equal(resolveConfig(readEnv({ LOOPMESH_ADMIN: '0.0.0.0:1', LOOPMESH_ADMIN_PUBLIC: '1' })).admin?.host, '0.0.0.0');
});

test('isLoopbackHost: 127/8, ::1 (also IPv4-mapped), localhost; nothing else', () => {
  const yes = ['127.0.0.1', '127.255.0.9', '::1', '[::1]', '::ffff:127.0.0.1', 'localhost', 'LOCALHOST'];
  const no = ['0.0.0.0', '::', '10.0.0.1', '128.0.0.1', '::ffff:10.0.0.1', 'localhost.', 'localhost.example', 'evil.example', '127.0.0.1.nip.io', ''];
  for (const h of yes) assert.equal(isLoopbackHost(h), true, h);
  for (const h of no) assert.equal(isLoopbackHost(h), false, h);
});

test('a bad value with a newline is quoted in the message, not printed across lines', () => {
  assert.throws(() => resolveConfig({ handoverTimeout: '5\nx' }), (err: Error) => err.message === '--handover-timeout: expected a number of seconds from 1 to 600, got "5\\nx"' && !err.message.includes('\n'));
  assert.throws(() => resolveConfig({ drainTimeout: '1\n2' }), (err: Error) => !err.message.includes('\n') && err.message.includes('"1\\n2"'));
});
