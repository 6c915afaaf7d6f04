import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TokenFile, tlsFailure } from '../../../agent/consul/client.js';
import type { ConsulTls } from '../../../agent/config/config.js';
import { captureLogger } from '../../support/log.js';

test('TokenFile: a rotated file is read again within the interval; a 403 looks at once; a bad file keeps the last token', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-token-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'token');
  await writeFile(path, 'first-token\n');
  let now = 1_000_000;
  const { logger, lines, text } = captureLogger('trace');
  const source = new TokenFile(path, logger, { initial: 'first-token', intervalMs: 1000, now: () => now });
  assert.equal(await source.current(), 'first-token');

  // Rewritten in place (same size): not looked at before the interval, used after it.
  await writeFile(path, 'other-token\n');
  now += 500;
  assert.equal(await source.current(), 'first-token', 'checked at most once per interval');
  now += 500;
  assert.equal(await source.current(), 'other-token');

  // Replaced by rename (how Vault agent and Kubernetes rotate): a new inode.
  await writeFile(join(dir, 'token.new'), 'third-token');
  await rename(join(dir, 'token.new'), path);
  source.rejected();
  assert.equal(await source.current(), 'third-token', 'a 403 looks again without waiting');

  // Gone, then empty: the last token stays, each failure said once.
  await rm(path);
  for (let i = 0; i < 3; i += 1) {
    now += 1000;
    assert.equal(await source.current(), 'third-token');
  }
  await writeFile(path, '  \n');
  for (let i = 0; i < 3; i += 1) {
    now += 1000;
    assert.equal(await source.current(), 'third-token');
  }
  const problems = lines.filter((l) => l.code === 'LM_ERR_TOKEN_FILE');
  assert.deepEqual(
    problems.map((l) => l.msg),
    [`cannot read the token file "${path}" (ENOENT); keeping the last token read from it`, `the token file "${path}" is empty; keeping the last token read from it`],
  );
  assert.ok(problems.every((l) => l.level === 40), 'warn level');

  await writeFile(path, 'fourth-token');
  now += 1000;
  assert.equal(await source.current(), 'fourth-token');
  assert.ok(lines.some((l) => l.msg === 'the token file is readable again'));
  for (const secret of ['first-token', 'other-token', 'third-token', 'fourth-token']) assert.ok(!text().includes(secret), `${secret} never logged`);
});

test('TokenFile: concurrent requests share one read', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-token-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'token');
  await writeFile(path, 'shared');
  const { logger } = captureLogger();
  const source = new TokenFile(path, logger);
  assert.deepEqual(await Promise.all([source.current(), source.current(), source.current()]), ['shared', 'shared', 'shared']);
});

test('tlsFailure: each handshake failure names its cause and the setting to fix; other errors are not TLS', () => {
  const url = 'https://127.0.0.1:8501';
  const files: ConsulTls = { caFile: '/etc/consul/ca.pem', ca: 'x', certFile: '/etc/consul/client.pem', cert: 'x', keyFile: '/etc/consul/client-key.pem', key: 'x', serverName: 'wrong.example' };
  const none: ConsulTls = { caFile: undefined, ca: undefined, certFile: undefined, cert: undefined, keyFile: undefined, key: undefined, serverName: undefined };
  const cases: [string, string, ConsulTls, RegExp][] = [
    ['UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'unable to verify the first certificate', files, /^the certificate of Consul at https:\/\/127\.0\.0\.1:8501 is not signed by the CA in --ca-file "\/etc\/consul\/ca\.pem" \(UNABLE_TO_VERIFY_LEAF_SIGNATURE: unable to verify the first certificate\)$/],
    ['SELF_SIGNED_CERT_IN_CHAIN', 'self-signed certificate in certificate chain', none, /not signed by the system's CAs \(no --ca-file \/ CONSUL_CACERT given\)/],
    ['CERT_HAS_EXPIRED', 'certificate has expired', files, /has expired/],
    ['ERR_TLS_CERT_ALTNAME_INVALID', "Hostname/IP does not match certificate's altnames", files, /does not hold --tls-server-name "wrong\.example"; set --tls-server-name \(CONSUL_TLS_SERVER_NAME\)/],
    ['ERR_TLS_CERT_ALTNAME_INVALID', "Hostname/IP does not match certificate's altnames", none, /does not hold the host of https:\/\/127\.0\.0\.1:8501/],
    ['ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED', 'C0:error:0A00045C:SSL routines:ssl3_read_bytes:tlsv13 alert certificate required:../ssl/rec_layer_s3.c:1601:SSL alert number 116', none, /asks for a client certificate \(verify_incoming\) and none is set; set --client-cert and --client-key \(CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY\) \(ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED: tlsv13 alert certificate required\)$/],
    ['EPROTO', 'write EPROTO C0:error:0A000410:SSL routines:ssl3_read_bytes:sslv3 alert handshake failure:../ssl/rec_layer_s3.c:1601:SSL alert number 40', none, /asks for a client certificate/],
    ['ERR_SSL_TLSV1_ALERT_UNKNOWN_CA', 'C0:error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown ca', files, /refused the client certificate --client-cert "\/etc\/consul\/client\.pem"/],
    ['ERR_SSL_WRONG_VERSION_NUMBER', 'C0:error:0A00010B:SSL routines:ssl3_get_record:wrong version number', files, /does not answer TLS: is that a plain HTTP port\?/],
    ['ERR_SSL_SOMETHING_ELSE', 'odd', files, /^the TLS handshake with Consul at https:\/\/127\.0\.0\.1:8501 failed \(ERR_SSL_SOMETHING_ELSE: odd\)$/],
  ];
  for (const [code, message, tls, pattern] of cases) assert.match(tlsFailure(code, message, url, tls) ?? 'not TLS', pattern, code);
  for (const code of ['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', '']) assert.equal(tlsFailure(code, 'x', url, files), undefined, code);
});
