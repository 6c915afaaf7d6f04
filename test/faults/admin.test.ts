import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import type { Agent } from '../../agent/agent.js';
import { sleep } from '../../agent/sleep.js';
import { removeDir, startAgent } from '../support/agent.js';
import { TestConsul } from '../support/consul.js';
import { captureLogger } from '../support/log.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';

const repo = join(import.meta.dirname, '..', '..');
const main = join(repo, 'agent', 'cli', 'main.ts');
/** The agent's own environment, without anything from the caller that would change its config. */
const cleanEnv = { CONSUL_HTTP_ADDR: '', CONSUL_HTTP_TOKEN: '', CONSUL_HTTP_TOKEN_FILE: '', LOOPMESH_ADMIN: '', LOOPMESH_LOG_FORMAT: 'json' };

const served = (agent: Agent, service: string) => agent.dataPlane?.config()?.services.find((s) => s.service === service);

function get(port: number, path: string, host: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, headers: { host }, timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** `loopmesh agent ARGS` until it says it started (or exits); then SIGTERM. Returns its JSON log lines. */
async function agentLog(args: string[], env: Record<string, string> = {}): Promise<{ lines: { level: number; code?: string; msg: string }[]; stderr: string; exitCode: number | undefined }> {
  const child = execa('node', ['--import', 'tsx', main, 'agent', ...args], { reject: false, env: { ...cleanEnv, ...env }, cwd: repo });
  let stderr = '';
  child.stderr?.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
  try {
    await eventually(() => stderr.includes('loopmesh agent started') || child.exitCode !== null, 30_000, 'loopmesh agent started');
  } finally {
    child.kill('SIGTERM');
  }
  const result = await child;
  const lines = stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { level: number; code?: string; msg: string });
  return { lines, stderr, exitCode: result.exitCode };
}

describe('admin port: DNS rebinding and exposure (finding 8)', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let node: Awaited<ReturnType<typeof startAgent>>;
  const log = captureLogger('debug');

  before(async () => {
    consul = await TestConsul.start();
    node = await startAgent(consul.url, {}, undefined, log.logger);
  });

  after(async () => {
    await node?.stop().catch(() => undefined);
    await consul?.close();
    if (node) await removeDir(node.dir);
  });

  test('a forged Host (node http.request and curl) gets 421 and a short reason; loopback names and the admin address get answers', async () => {
    const port = node.config.admin!.port;
    for (const host of ['evil.example', `evil.example:${port}`, 'localhost.evil.example', `127.0.0.1.nip.io:${port}`]) {
      const res = await get(port, '/v1/routes', host);
      assert.equal(res.status, 421, host);
      assert.match(res.body, /^misdirected request: Host ".*" is not this admin address; expected 127\.0\.0\.1:\d+, localhost or 127\.0\.0\.1\n$/, host);
      assert.ok(!res.body.includes('"routes"'), `${host}: no report leaked`);
    }
    const curl = await execa('curl', ['-s', '-S', '-H', 'Host: evil.example', '-w', '\n%{http_code}', `http://127.0.0.1:${port}/v1/routes`]);
    assert.match(curl.stdout, /^misdirected request: Host "evil\.example" is not this admin address.*\n\n421$/);
    for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, `[::1]:${port}`, 'localhost']) {
      const res = await get(port, '/v1/routes', host);
      assert.equal(res.status, 200, host);
      assert.ok(Array.isArray(JSON.parse(res.body).routes), host);
    }
    // What an operator runs, unchanged: curl and `loopmesh status` send Host 127.0.0.1:PORT.
    assert.equal((await execa('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', `http://127.0.0.1:${port}/v1/routes`])).stdout, '200');
    const status = await execa('node', ['--import', 'tsx', main, 'status', '--admin', `127.0.0.1:${port}`], { reject: false, env: cleanEnv });
    assert.equal(status.exitCode, 0, status.stderr);
    const refused = log.lines.filter((l) => l.code === 'LM_ERR_ADMIN_HOST');
    assert.equal(refused.length, 5);
    assert.ok(refused.every((l) => l.level === 20), 'at debug: a browser can send many');
  });

  test('--admin outside loopback without --admin-public is a config error naming the value and the flag', async () => {
    for (const admin of ['0.0.0.0:9190', '[::]:9190', '192.0.2.10:9190']) {
      const r = await execa('node', ['--import', 'tsx', main, 'agent', '--admin', admin, '--dns', 'off', '--hosts-file', 'off'], { reject: false, env: cleanEnv });
      assert.equal(r.exitCode, 2, admin);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.ok(r.stderr.includes(`--admin: "${admin}" is not a loopback address`) && r.stderr.includes('--admin-public'), r.stderr);
    }
  });

  test('with --admin-public on 0.0.0.0 (in a network namespace): LM_ERR_ADMIN_PUBLIC at start; the address used passes, a foreign Host or no Host from off-host is refused', async (t) => {
    const probe = await execa('unshare', ['-n', 'true'], { reject: false });
    if (probe.exitCode !== 0) return t.skip('cannot make a network namespace here (needs root)');
    const dir = await mkdtemp(join(tmpdir(), 'loopmesh-admin-public-'));
    t.after(() => rm(dir, { recursive: true, force: true }));
    // Inside its own namespace 192.0.2.10 (TEST-NET-1) is a non-loopback address of this "node" and nothing else.
    const script = `
      set -e
      ip link set lo up; ip addr add 192.0.2.10/32 dev lo
      node --import tsx ${JSON.stringify(main)} agent --admin 0.0.0.0:9190 --admin-public --dns off --hosts-file off --run-dir ${JSON.stringify(join(dir, 'run'))} --consul 127.0.0.1:1 --log-level debug 2>${JSON.stringify(join(dir, 'log'))} &
      agent=$!
      for i in $(seq 1 150); do curl -s -o /dev/null http://127.0.0.1:9190/ && break; sleep 0.2; done
      code() { curl -s -o /dev/null -w '%{http_code}' "$@"; echo; }
      code -H 'Host: evil.example' http://192.0.2.10:9190/v1/routes
      code -H 'Host: evil.example:9190' http://192.0.2.10:9190/v1/routes
      code http://192.0.2.10:9190/v1/routes
      code -H 'Host: 192.0.2.10:8080' http://192.0.2.10:9190/v1/routes
      code --http1.0 -H 'Host:' http://192.0.2.10:9190/v1/routes
      code --http1.0 -H 'Host:' http://127.0.0.1:9190/v1/routes
      code -H 'Host: localhost:9190' http://127.0.0.1:9190/v1/routes
      kill $agent; wait $agent || true`;
    const r = await execa('unshare', ['-n', 'bash', '-c', script], { reject: false, env: { ...process.env, ...cleanEnv }, cwd: repo, timeout: 60_000 });
    assert.equal(r.exitCode, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n'), ['421', '421', '200', '421', '421', '200', '200']);
    const lines = (await readFile(join(dir, 'log'), 'utf8'))
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { level: number; code?: string; msg: string });
    const warning = lines.find((l) => l.code === 'LM_ERR_ADMIN_PUBLIC');
    assert.equal(warning?.level, 40);
    assert.match(warning?.msg ?? '', /admin HTTP listens on http:\/\/0\.0\.0\.0:9190, outside loopback \(--admin-public\)/);
    assert.equal(lines.filter((l) => l.code === 'LM_ERR_ADMIN_HOST').length, 4);
  });
});

describe('the Consul token: argv warning, rotation without restart, never logged (finding 8)', { timeout: 180_000 }, () => {
  let consul: TestConsul;
  let web: IdServer;
  let api: IdServer;
  const dirs: string[] = [];

  before(async () => {
    consul = await TestConsul.start({ hcl: 'acl { enabled = true, default_policy = "deny", tokens { initial_management = "root-secret" } }', token: 'root-secret' });
    web = await startIdServer('acl-web-a');
    api = await startIdServer('acl-api-a');
    await consul.register({ id: web.id, name: 'acl-web', port: web.port, meta: { 'loopmesh-port': String(await freePort()) }, ttlCheck: { passing: true } });
  });

  after(async () => {
    await Promise.all([web?.close(), api?.close()]);
    await consul?.close();
    await Promise.all(dirs.map(removeDir));
  });

  test('--token on the command line logs LM_ERR_TOKEN_IN_ARGV (never the token); from the environment it does not', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'loopmesh-argv-'));
    dirs.push(dir);
    const common = ['--consul', consul.url, '--admin', 'off', '--dns', 'off', '--hosts-file', 'off', '--log-level', 'debug'];
    const [argv, env] = await Promise.all([
      agentLog(['--token', 'argv-secret-7f3a', '--run-dir', join(dir, 'a'), ...common]),
      agentLog(['--run-dir', join(dir, 'b'), ...common], { CONSUL_HTTP_TOKEN: 'env-secret-9c1d' }),
    ]);
    const warning = argv.lines.find((l) => l.code === 'LM_ERR_TOKEN_IN_ARGV');
    assert.equal(warning?.level, 40, argv.stderr);
    assert.match(warning?.msg ?? '', /--token on the command line is visible to every local user in the process list .*--token-file FILE or the CONSUL_HTTP_TOKEN environment variable/);
    assert.ok(!argv.stderr.includes('argv-secret-7f3a'), 'the token itself is not logged');
    assert.equal(env.lines.filter((l) => l.code === 'LM_ERR_TOKEN_IN_ARGV').length, 0, env.stderr);
    assert.ok(!env.stderr.includes('env-secret-9c1d'));
    assert.ok(env.lines.some((l) => l.msg === 'loopmesh agent started'), env.stderr);
  });

  test('a wrong token in the file: no routes and 403 reported; the file rewritten with the right one: routes, no restart; file gone: the last token is kept', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'loopmesh-acl-'));
    dirs.push(dir);
    const tokenFile = join(dir, 'consul-token');
    await writeFile(tokenFile, 'wrong-token\n', { mode: 0o600 });
    const log = captureLogger('trace');
    const node = await startAgent(consul.url, { tokenFile }, undefined, log.logger);
    dirs.push(node.dir);
    try {
      await eventually(() => /HTTP 403/.test(node.agent.watcher.status().lastError?.message ?? ''), 15_000, 'a 403 from Consul');
      await sleep(2000);
      assert.equal(node.agent.routes().length, 0, 'nothing routed with a wrong token');
      assert.equal(node.agent.watcher.status().lastError?.code, 'LM_ERR_CONSUL_STATUS');
      assert.ok(log.lines.some((l) => l.level === 40 && /HTTP 403/.test(l.msg)), 'the 403 is in the log');
      assert.equal(node.agent.health().status, 'degraded');

      // Same length, rewritten in place: only the file's times say it changed.
      await writeFile(tokenFile, 'root-secret\n');
      const start = Date.now();
      const route = await eventually(() => served(node.agent, 'acl-web'), 30_000, 'acl-web routed with the rotated token');
      assert.equal(await whoAnswers(route.address, route.port), 'acl-web-a');
      assert.ok(log.lines.some((l) => l.msg.startsWith('the token file changed')), 'the rotation is logged');
      const tookMs = Date.now() - start;

      // The file removed: the next requests (a new service) report LM_ERR_TOKEN_FILE once and keep the last token.
      await rm(tokenFile);
      await sleep(1100);
      await consul.register({ id: api.id, name: 'acl-api', port: api.port, meta: { 'loopmesh-port': String(await freePort()) }, ttlCheck: { passing: true } });
      await eventually(() => served(node.agent, 'acl-api'), 30_000, 'acl-api routed with the last good token');
      const problem = log.lines.find((l) => l.code === 'LM_ERR_TOKEN_FILE');
      assert.match(problem?.msg ?? '', /cannot read the token file ".*consul-token" \(ENOENT\); keeping the last token read from it/);
      assert.equal(log.lines.filter((l) => l.code === 'LM_ERR_TOKEN_FILE').length, 1, 'said once');

      const routes = await get(node.config.admin!.port, '/v1/routes', `127.0.0.1:${node.config.admin!.port}`);
      assert.equal(routes.status, 200);
      for (const secret of ['root-secret', 'wrong-token']) {
        assert.ok(!log.text().includes(secret), `${secret} never in the log (${log.lines.length} lines at trace)`);
        assert.ok(!routes.body.includes(secret), `${secret} never in /v1/routes`);
      }
      assert.ok(tookMs < 30_000, `${tookMs} ms`);
    } finally {
      await node.stop();
    }
  });
});
