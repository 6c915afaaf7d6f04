import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { codes, type Problem } from '../../agent/errors.js';
import type { Agent } from '../../agent/agent.js';
import { TestConsul } from '../support/consul.js';
import { removeDir, startAgent } from '../support/agent.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { WrongShapeConsulProxy, type WrongShape } from '../support/wrong-shape-consul.js';

function route(agent: Agent, service: string) {
  return agent.dataPlane!.config()?.services.find((s) => s.service === service);
}

function backends(agent: Agent, service: string): string[] {
  return (route(agent, service)?.backends ?? []).map((b) => `${b.address}:${b.port}`).sort();
}

/** Who answers `n` connections through the service's route. */
async function answers(agent: Agent, service: string, n = 6): Promise<Set<string>> {
  const r = route(agent, service);
  assert.ok(r, `a route for ${service}`);
  const seen = new Set<string>();
  for (let i = 0; i < n; i += 1) seen.add(await whoAnswers(r.address, r.port).catch((err: Error) => `error: ${err.message}`));
  return seen;
}

/** The problems an operator sees: the admin API's report. */
async function reported(agent: Agent): Promise<Problem[]> {
  const res = await fetch(`${agent.adminUrl()}/v1/routes`, { signal: AbortSignal.timeout(3000) });
  return ((await res.json()) as { problems: Problem[] }).problems;
}

const shapes: Array<{ shape: WrongShape; what: string; why: RegExp }> = [
  { shape: 'object', what: 'an object instead of an array', why: /wrong shape: health\/service\/web: expected an array of \{Node, Service, Checks\} entries, got an object/ },
  { shape: 'junk-entry', what: 'an array with a junk entry', why: /wrong shape: health\/service\/web: entry 2 of 3: Service: expected an object, got nothing; Checks: expected an array, got nothing/ },
  { shape: 'truncated', what: 'truncated JSON', why: /reading it from Consul failed \(LM_ERR_CONSUL_\w+\): .*(JSON|decode)/ },
  { shape: 'http-500', what: 'HTTP 500', why: /reading it from Consul failed \(LM_ERR_CONSUL_STATUS\): .*HTTP 500/ },
];

describe('answers from Consul that cannot be trusted: a real Consul, behind WrongShapeConsulProxy for the wrong shapes', { timeout: 240_000 }, () => {
  let consul: TestConsul;
  let proxy: WrongShapeConsulProxy;
  let node: Awaited<ReturnType<typeof startAgent>>;
  const servers: IdServer[] = [];
  let webPort: number;
  const webPorts: Record<string, number> = {};

  const serve = async (id: string): Promise<IdServer> => {
    const s = await startIdServer(id);
    servers.push(s);
    return s;
  };

  before(async () => {
    consul = await TestConsul.start();
    proxy = await WrongShapeConsulProxy.start(consul.url);
    webPort = await freePort();
    for (const id of ['web-a', 'web-b']) {
      webPorts[id] = (await serve(id)).port;
      await consul.register({ id, name: 'web', port: webPorts[id], meta: { 'loopmesh-port': String(webPort) }, ttlCheck: { passing: true } });
    }
    await consul.register({ id: 'db-a', name: 'db', port: (await serve('db-a')).port, meta: { 'loopmesh-port': String(await freePort()) }, ttlCheck: { passing: true } });
    node = await startAgent(proxy.url);
    await eventually(() => backends(node.agent, 'web').length === 2 && backends(node.agent, 'db').length === 1, 15_000, 'web (2 backends) and db routed through the proxy');
  });

  after(async () => {
    await node?.stop().catch(() => undefined);
    await proxy?.close();
    await Promise.all(servers.map((s) => s.close()));
    await consul?.close();
    if (node) await removeDir(node.dir);
  });

  for (const { shape, what, why } of shapes) {
    test(`health/service/web answered with ${what}: web keeps its backends and is reported stale; db and a new service are unaffected; the mark clears once web's answers are good`, async (t) => {
      const webBefore = backends(node.agent, 'web');
      const dbBefore = backends(node.agent, 'db');
      proxy.wrongShape('web', shape);
      // web's tags change, so web is read again (with the fault); a new service is read on its own.
      await consul.register({ id: 'web-a', name: 'web', port: webPorts['web-a'] ?? 0, tags: [`seen-${shape}`], meta: { 'loopmesh-port': String(webPort) }, ttlCheck: { passing: true } });
      const late = `late-${shape}`;
      await consul.register({ id: late, name: late, port: (await serve(late)).port, meta: { 'loopmesh-port': String(await freePort()) }, ttlCheck: { passing: true } });
      t.after(() => consul.deregister(late));

      await eventually(() => route(node.agent, late)?.backends.length === 1, 10_000, `${late} routed while web's answers are wrong`);
      assert.deepEqual(await answers(node.agent, late, 2), new Set([late]), 'the new service is reachable');
      const stale = await eventually(() => node.agent.watcher.stale().get('web'), 10_000, 'web marked stale');
      assert.ok(proxy.rewritten('web') >= 1, 'the wrong shape was served');
      assert.equal(stale.code, codes.consulStale);
      assert.match(stale.message, why);
      assert.match(stale.message, /its last good read \(2 healthy instances\) stays in service, retrying$/);

      assert.deepEqual(backends(node.agent, 'web'), webBefore, 'web keeps its last good backends');
      assert.deepEqual(await answers(node.agent, 'web'), new Set(['web-a', 'web-b']), 'and is reachable through them');
      assert.deepEqual(backends(node.agent, 'db'), dbBefore);
      assert.deepEqual(await answers(node.agent, 'db', 2), new Set(['db-a']), 'db is untouched');
      const problems = await reported(node.agent);
      assert.ok(
        problems.some((p) => p.code === codes.consulStale && p.service === 'web' && why.test(p.message)),
        `the admin report names web as stale: ${JSON.stringify(problems)}`,
      );
      assert.ok(!problems.some((p) => p.service !== 'web' && p.code === codes.consulStale), 'no other service is stale');
      const rewritten = proxy.rewritten('web');
      await eventually(() => proxy.rewritten('web') > rewritten, 10_000, 'web read again by the retry, nothing having changed in Consul');

      proxy.heal('web');
      await eventually(() => node.agent.watcher.stale().size === 0, 15_000, 'the stale mark cleared by the next good answer');
      await eventually(async () => !(await reported(node.agent)).some((p) => p.code === codes.consulStale), 5000, 'no stale problem reported');
      assert.deepEqual(backends(node.agent, 'web'), webBefore);
    });
  }

  test('an instance address with a newline (Consul accepts it) reaches no rendered file and is reported; the good instance routes', async () => {
    const good = await serve('shop-good');
    const shopPort = String(await freePort());
    await consul.register({ id: 'shop-good', name: 'shop', port: good.port, meta: { 'loopmesh-port': shopPort }, ttlCheck: { passing: true } });
    const evil = '10.0.0.9\nserver evil 6.6.6.6:80';
    // Through the real Consul API, to show it takes the value as it is.
    await consul.register({ id: 'shop-evil', name: 'shop', address: evil, port: 80, meta: { 'loopmesh-port': shopPort }, ttlCheck: { passing: true } });
    const stored = (await consul.api('GET', '/v1/agent/service/shop-evil')) as { Address: string };
    assert.equal(stored.Address, evil, 'Consul stored the address with its newline');

    await eventually(() => route(node.agent, 'shop')?.backends.length === 1, 10_000, 'shop routed');
    assert.deepEqual(backends(node.agent, 'shop'), [`127.0.0.1:${good.port}`]);
    assert.deepEqual(await answers(node.agent, 'shop', 3), new Set(['shop-good']));

    const runDir = node.config.runDir;
    // The agent serves a change before it writes the files (serve, then write): wait for the write.
    const goodLine = new RegExp(`server s0 127\\.0\\.0\\.1:${good.port} `);
    const haproxy = await eventually(async () => {
      const text = await readFile(join(runDir, 'haproxy.cfg'), 'utf8').catch(() => '');
      return goodLine.test(text) && text;
    }, 5000, 'the good instance in haproxy.cfg');
    const balancer = await eventually(async () => {
      const text = await readFile(join(runDir, 'balancer.json'), 'utf8').catch(() => '');
      return new RegExp(`"port":\\s*${good.port}\\b`).test(text) && text;
    }, 5000, 'the good instance in balancer.json');
    for (const file of await readdir(runDir)) {
      const text = await readFile(join(runDir, file), 'utf8').catch(() => '');
      assert.doesNotMatch(text, /evil|6\.6\.6\.6|10\.0\.0\.9/, `${file} holds nothing of the bad address`);
    }
    assert.doesNotMatch(haproxy + balancer, /shop-evil/);
    assert.doesNotMatch(await readFile(node.config.hostsFile!, 'utf8'), /evil|6\.6\.6\.6/);

    const problem = (await reported(node.agent)).find((p) => p.code === codes.consulInvalidInstance && p.service === 'shop');
    assert.ok(problem, 'reported with LM_ERR_CONSUL_INVALID_INSTANCE');
    assert.equal(
      problem.message.split(';')[0],
      `service "shop": instance "shop-evil" on node "loopmesh-test-${consul.httpPort}" has the address "10.0.0.9\\nserver evil 6.6.6.6:80"`,
    );
    assert.match(problem.message, /expected an IP address .* or a host name/);

    await consul.deregister('shop-evil');
    await eventually(async () => !(await reported(node.agent)).some((p) => p.code === codes.consulInvalidInstance), 10_000, 'the problem goes with the registration');
  });
});
