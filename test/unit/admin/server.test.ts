import { test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { connect } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { misdirected, type AdminRequestSite } from '../../../agent/admin/host.js';
import { AdminServer } from '../../../agent/admin/server.js';
import { Agent } from '../../../agent/agent.js';
import { resolveConfig } from '../../../agent/config/config.js';
import { silentLogger } from '../../../agent/log.js';
import { captureLogger } from '../../support/log.js';

const site = (host: string | undefined, over: Partial<AdminRequestSite> = {}): AdminRequestSite => ({ host, adminHost: '127.0.0.1', adminPort: 9190, localAddress: '127.0.0.1', peer: '127.0.0.1', ...over });

test('misdirected: the admin address with its port or a loopback name pass; any other Host is refused', () => {
  const pass: [string, AdminRequestSite][] = [
    ['admin address and port', site('127.0.0.1:9190')],
    ['loopback IP without port', site('127.0.0.1')],
    ['localhost with port', site('localhost:9190')],
    ['localhost without port', site('localhost')],
    ['LOCALHOST in capitals', site('LOCALHOST:9190')],
    ['[::1] with port', site('[::1]:9190')],
    ['[::1] without port', site('[::1]')],
    ['a loopback name through a tunnel on another port', site('localhost:8080')],
    ['another 127/8 address literal', site('127.0.0.2:9190')],
    ['no Host (HTTP/1.0) from a loopback peer', site(undefined)],
    ['no Host from ::1', site(undefined, { peer: '::1' })],
    ['no Host from IPv4-mapped loopback', site(undefined, { peer: '::ffff:127.0.0.1' })],
    ['public admin: the address the client used, with the port', site('192.0.2.10:9190', { adminHost: '0.0.0.0', localAddress: '192.0.2.10', peer: '192.0.2.99' })],
    ['public admin on IPv6: the address the client used', site('[2001:db8::5]:9190', { adminHost: '::', localAddress: '2001:db8::5', peer: '2001:db8::9' })],
    ['public admin: the configured address', site('192.0.2.10:9190', { adminHost: '192.0.2.10', localAddress: '192.0.2.10', peer: '192.0.2.99' })],
    ['admin on port 80: the address without a port', site('192.0.2.10', { adminHost: '192.0.2.10', adminPort: 80, localAddress: '192.0.2.10', peer: '192.0.2.99' })],
  ];
  for (const [what, s] of pass) assert.equal(misdirected(s), undefined, what);
  const refuse: [string, AdminRequestSite, RegExp][] = [
    ['a rebound DNS name', site('evil.example'), /^Host "evil\.example" is not this admin address; expected 127\.0\.0\.1:9190, localhost or 127\.0\.0\.1$/],
    ['a rebound DNS name with the admin port', site('evil.example:9190'), /^Host "evil\.example:9190" is not/],
    ['a name that resolves to loopback but is not a loopback name', site('127.0.0.1.nip.io:9190'), /is not this admin address/],
    ['localhost with a trailing dot (resolvable by DNS)', site('localhost.:9190'), /is not this admin address/],
    ['localhost as a subdomain', site('localhost.evil.example:9190'), /is not this admin address/],
    ['an empty Host from a remote peer', site('', { peer: '192.0.2.99' }), /^no Host header from 192\.0\.2\.99; expected/],
    ['no Host from a remote peer', site(undefined, { adminHost: '0.0.0.0', localAddress: '192.0.2.10', peer: '192.0.2.99' }), /^no Host header from 192\.0\.2\.99; expected an address of this node with port 9190, localhost or 127\.0\.0\.1$/],
    ['public admin: its own address on another port', site('192.0.2.10:8080', { adminHost: '0.0.0.0', localAddress: '192.0.2.10', peer: '192.0.2.99' }), /is not this admin address/],
    ['public admin: its own address without the port', site('192.0.2.10', { adminHost: '0.0.0.0', localAddress: '192.0.2.10', peer: '192.0.2.99' }), /is not this admin address/],
    ['public admin: some other address', site('192.0.2.11:9190', { adminHost: '0.0.0.0', localAddress: '192.0.2.10', peer: '192.0.2.99' }), /is not this admin address/],
    ['IPv6 without brackets', site('::1'), /is not this admin address/],
    ['a port out of range form', site('localhost:9190:1'), /is not this admin address/],
    ['spaces', site('localhost 9190'), /is not this admin address/],
    ['a long name is cut in the message', site(`${'a'.repeat(200)}.example`), /^Host "a{77}\.\.\." is not this admin address/],
  ];
  for (const [what, s, pattern] of refuse) assert.match(misdirected(s) ?? 'passed', pattern, what);
});

interface Answer {
  status: number;
  type: string | undefined;
  body: string;
}

function get(port: number, path: string, host: string | undefined): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, headers: host === undefined ? {} : { host }, setHost: host === undefined ? false : undefined, timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: res.headers['content-type'], body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** HTTP/1.0 without a Host header, as old clients send it. */
function getHttp10(port: number, path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => socket.write(`GET ${path} HTTP/1.0\r\n\r\n`));
    let text = '';
    socket.setEncoding('utf8');
    socket.on('data', (c: string) => (text += c));
    socket.on('end', () => resolve(text));
    socket.on('error', reject);
  });
}

test('AdminServer over real sockets: 421 with a plain-text reason for a foreign Host, logged at debug as LM_ERR_ADMIN_HOST', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-admin-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const config = resolveConfig({ runDir: join(dir, 'run'), hostsFile: 'off', dns: 'off', admin: 'off' });
  const agent = new Agent(config, silentLogger());
  const { logger, lines } = captureLogger('debug');
  const admin = new AdminServer({ endpoint: { host: '127.0.0.1', port: 0 }, report: () => agent.statusReport(), logger });
  await admin.start();
  t.after(() => admin.close());
  const port = Number(new URL(admin.url()).port);

  const evil = await get(port, '/v1/routes', 'evil.example');
  assert.equal(evil.status, 421);
  assert.match(evil.type ?? '', /^text\/plain/);
  assert.match(evil.body, /^misdirected request: Host "evil\.example" is not this admin address; expected 127\.0\.0\.1:\d+, localhost or 127\.0\.0\.1\n$/);
  assert.equal((await get(port, '/health', `evil.example:${port}`)).status, 421);
  assert.equal((await get(port, '/metrics', 'attacker.test')).status, 421);

  for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, 'localhost', `[::1]:${port}`]) {
    const ok = await get(port, '/v1/routes', host);
    assert.equal(ok.status, 200, host);
    assert.equal(JSON.parse(ok.body).dataPlane, 'in-process', host);
  }
  assert.match(await getHttp10(port, '/v1/routes'), /^HTTP\/1\.1 200 /);

  const logged = lines.filter((l) => l.code === 'LM_ERR_ADMIN_HOST');
  assert.equal(logged.length, 3);
  assert.ok(logged.every((l) => l.level === 20), 'debug level');
  assert.match(logged[0]?.msg ?? '', /Host "evil\.example"/);
  assert.equal(lines.filter((l) => l.code === 'LM_ERR_ADMIN_PUBLIC').length, 0, 'a loopback admin gives no public warning');
});
