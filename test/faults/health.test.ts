import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import type { Agent } from '../../agent/agent.js';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { removeDir, startAgent } from '../support/agent.js';
import { health, listening } from '../support/served.js';

/** /health tells the truth (issue 7, finding 7): 200 "ok" only when every route is served and the last render succeeded. */

function listen(server: Server, host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
}

/** The route is served all the same, and /health says 503 with a reason of `code` naming `file`; stops the agent. */
async function servedYet503(node: Awaited<ReturnType<typeof startAgent>>, code: string, file: string): Promise<void> {
  try {
    await eventually(() => listening(node.agent, 'web'), 10_000, 'web listening all the same');
    const h = await eventually(async () => {
      const r = await health(node.agent);
      return r.code === 503 ? r : undefined;
    }, 10_000, '503');
    assert.ok(h.reasons.some((r) => r.code === code && r.message.includes(file)), JSON.stringify(h.reasons));
  } finally {
    await node.stop();
  }
}

describe('faults: health that does not lie', { timeout: 180_000 }, () => {
  let consul: TestConsul;
  let backend: IdServer;
  let port: number;
  const dirs: string[] = [];
  const register = (name: string): Promise<void> => consul.register({ id: `${name}-1`, name, port: backend.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });

  before(async () => {
    consul = await TestConsul.start();
    backend = await startIdServer('backend');
    port = await freePort();
    await register('web');
  });

  after(async () => {
    await backend?.close();
    await consul?.close();
    await Promise.all(dirs.map(removeDir));
  });

  test('a port already taken on a service\'s address: 503 naming it, the others served, and it recovers by itself', async () => {
    // The address the table will give "taken", held by another program before loopmesh starts.
    await consul.api('PUT', '/v1/kv/loopmesh/addresses', { version: 1, addresses: { taken: '127.78.9.9' } });
    const squatter = createServer((s) => s.end('squatter\n'));
    await listen(squatter, '127.78.9.9', port);
    await register('taken');
    const node = await startAgent(consul.url);
    dirs.push(node.dir);
    try {
      await eventually(() => listening(node.agent, 'web'), 10_000, 'web listening');
      const h = await eventually(async () => {
        const r = await health(node.agent);
        return r.reasons.some((x) => x.service === 'taken') ? r : undefined;
      }, 10_000, 'health naming "taken"');
      assert.equal(h.code, 503);
      assert.equal(h.status, 'failing');
      const reason = h.reasons.find((x) => x.service === 'taken')!;
      assert.equal(reason.code, 'LM_ERR_BALANCER_LISTEN');
      assert.match(reason.message, /127\.78\.9\.9/);
      assert.match(reason.message, /EADDRINUSE/);
      const metrics = async (): Promise<string> => (await fetch(`http://127.0.0.1:${node.config.admin!.port}/metrics`)).text();
      assert.match(await metrics(), /^loopmesh_healthy 0$/m);
      assert.match(await metrics(), /^loopmesh_health_reasons\{code="LM_ERR_BALANCER_LISTEN"\} 1$/m);
      // One broken service never stops the others: web serves, and a new service still arrives.
      assert.equal(await whoAnswers(node.agent.dataPlane!.balancer.snapshot().find((s) => s.service === 'web')!.address, port), 'backend');
      await register('late');
      await eventually(() => listening(node.agent, 'late'), 10_000, 'a later service listening');
      // The status command shows the same verdict.
      const status = await execa('node', ['--import', 'tsx', 'agent/cli/main.ts', 'status', '--admin', `127.0.0.1:${node.config.admin!.port}`], { reject: false, cwd: join(import.meta.dirname, '..', '..') });
      assert.match(status.stdout, /health FAILING: .*LM_ERR_BALANCER_LISTEN/);
      // The port is freed: retried without any change in Consul.
      await new Promise<void>((resolve) => squatter.close(() => resolve()));
      await eventually(() => listening(node.agent, 'taken'), 15_000, '"taken" listening once the port is free');
      await eventually(async () => (await health(node.agent)).code === 200, 5000, 'health 200');
      assert.match(await metrics(), /^loopmesh_healthy 1$/m);
      assert.equal(await whoAnswers('127.78.9.9', port), 'backend');
    } finally {
      squatter.close();
      await node.stop();
      await consul.deregister('taken-1');
      await consul.deregister('late-1');
    }
  });

  test('a template that fails to render: 503 naming the template, the last good files stay', async () => {
    const templates = await mkdtemp(join(tmpdir(), 'loopmesh-tpl-'));
    dirs.push(templates);
    // Compiles, but fails in strict mode on the first route: no such field.
    await writeFile(join(templates, 'extra.conf.hbs'), '{{#each routes}}{{nosuchfield}}{{/each}}\n');
    const node = await startAgent(consul.url, { templates });
    dirs.push(node.dir);
    await servedYet503(node, 'LM_ERR_RENDER_TEMPLATE', 'extra.conf.hbs');
  });

  test('a rendered file that cannot be written: 503 with LM_ERR_RENDER_WRITE', async () => {
    const base = await mkdtemp(join(tmpdir(), 'loopmesh-it-'));
    dirs.push(base);
    // haproxy.cfg is a folder: the write fails, balancer.json still lands.
    await mkdir(join(base, 'run', 'haproxy.cfg'), { recursive: true });
    await writeFile(join(base, 'hosts'), '');
    await servedYet503(await startAgent(consul.url, {}, base), 'LM_ERR_RENDER_WRITE', 'haproxy.cfg');
  });

  test('the address range exhausted: 503 naming the service left out, the others served', async () => {
    await consul.api('DELETE', '/v1/kv/loopmesh/addresses');
    await register('second');
    await register('third');
    // A /30 has two usable addresses for three services.
    const node = await startAgent(consul.url, { range: '127.79.0.0/30' });
    dirs.push(node.dir);
    try {
      const h = await eventually(async () => {
        const r = await health(node.agent);
        return r.reasons.some((x) => x.code === 'LM_ERR_PLAN_ADDRESSES_EXHAUSTED') ? r : undefined;
      }, 10_000, 'exhaustion reported');
      assert.equal(h.code, 503);
      const servedNow = (): string[] => node.agent.dataPlane!.balancer.snapshot().filter((s) => s.listening).map((s) => s.service);
      await eventually(() => servedNow().length === 2, 10_000, 'two of three served');
      assert.equal(servedNow().length, 2, `two of three served: ${servedNow().join(', ')}`);
      assert.equal((await health(node.agent)).code, 503, 'still 503 while one is left out');
    } finally {
      await node.stop();
      await consul.deregister('second-1');
      await consul.deregister('third-1');
    }
  });

  test('everything served and rendered: 200 "ok" with no reasons', async () => {
    await consul.api('DELETE', '/v1/kv/loopmesh/addresses');
    const node = await startAgent(consul.url);
    dirs.push(node.dir);
    try {
      await eventually(() => listening(node.agent, 'web'), 10_000, 'web listening');
      const h = await eventually(async () => {
        const r = await health(node.agent);
        return r.code === 200 ? r : undefined;
      }, 10_000, '200');
      assert.equal(h.status, 'ok');
      assert.deepEqual(h.reasons, []);
    } finally {
      await node.stop();
    }
  });
});
