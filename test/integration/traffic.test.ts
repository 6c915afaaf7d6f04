import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, watch } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { removeDir, startAgent } from '../support/agent.js';
import { parseStatusReport, statusTable } from '../../agent/cli/status.js';
import { ConsulClient } from '../../agent/consul/client.js';
import { codes } from '../../agent/errors.js';

/** `consul kv put KEY TEXT`: the raw text is the value. */
async function kvPut(consul: TestConsul, key: string, text: string): Promise<void> {
  const res = await fetch(`${consul.url}/v1/kv/${key}`, { method: 'PUT', body: text, signal: AbortSignal.timeout(5000) });
  assert.equal(res.status, 200, `PUT ${key}: HTTP ${res.status}`);
}

async function kvDelete(consul: TestConsul, key: string): Promise<void> {
  const res = await fetch(`${consul.url}/v1/kv/${key}`, { method: 'DELETE', signal: AbortSignal.timeout(5000) });
  assert.equal(res.status, 200, `DELETE ${key}: HTTP ${res.status}`);
}

interface RenderedService {
  service: string;
  address: string;
  port: number;
  split: Array<{ name: string; weight: number }>;
  backends: Array<{ id: string; subset: string }>;
}

/** `n` connections one after another through the route: who answered, counted. */
async function tally(address: string, port: number, n: number): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  for (let i = 0; i < n; i += 1) {
    const who = await whoAnswers(address, port).catch((err: Error) => `error: ${err.message}`);
    counts.set(who, (counts.get(who) ?? 0) + 1);
  }
  return counts;
}

describe('traffic document in Consul KV (gray release) with a real Consul', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let stable: IdServer;
  let canary: IdServer;
  let node: Awaited<ReturnType<typeof startAgent>>;

  async function web(): Promise<RenderedService | undefined> {
    const text = await readFile(join(node.config.runDir, 'balancer.json'), 'utf8').catch(() => '');
    if (!text) return undefined;
    const config = JSON.parse(text) as { services: RenderedService[] };
    return config.services.find((s) => s.service === 'web');
  }

  /** The live data plane serves this split (not only the file): what connections are balanced by. */
  function served(split: Array<{ name: string; weight: number }>): boolean {
    const spec = node.agent.dataPlane?.config()?.services.find((s) => s.service === 'web');
    return JSON.stringify(spec?.split ?? []) === JSON.stringify(split);
  }

  /** Served, and written to balancer.json (the agent serves a change before it writes the files). */
  async function servedAndWritten(split: Array<{ name: string; weight: number }>): Promise<boolean> {
    return served(split) && JSON.stringify((await web())?.split ?? []) === JSON.stringify(split);
  }

  async function routesReport(): Promise<ReturnType<typeof parseStatusReport>> {
    const res = await fetch(`${node.agent.adminUrl()}/v1/routes`, { signal: AbortSignal.timeout(5000) });
    assert.equal(res.status, 200);
    return parseStatusReport(await res.json());
  }

  before(async () => {
    consul = await TestConsul.start();
    stable = await startIdServer('web-stable');
    canary = await startIdServer('web-canary');
    const servicePort = await freePort();
    await consul.register({ id: 'web-stable', name: 'web', port: stable.port, meta: { 'loopmesh-port': String(servicePort) }, ttlCheck: { passing: true } });
    await consul.register({ id: 'web-canary', name: 'web', port: canary.port, tags: ['canary'], meta: { 'loopmesh-port': String(servicePort) }, ttlCheck: { passing: true } });
    node = await startAgent(consul.url);
    await eventually(async () => (await web())?.backends.length === 2, 10_000, 'web with two backends');
  });

  after(async () => {
    await node?.stop().catch(() => undefined);
    await Promise.all([stable?.close(), canary?.close()]);
    await consul?.close();
    if (node) await removeDir(node.dir);
  });

  test('no document: no split, both instances in the rest subset', async () => {
    const w = (await web())!;
    assert.deepEqual(w.split, []);
    assert.deepEqual(w.backends.map((b) => b.subset).sort(), ['', '']);
  });

  test('split canary 20: in balancer.json within 5 s, and 20% of 200 connections reach the canary', async (t) => {
    const started = Date.now();
    await kvPut(consul, 'loopmesh/traffic/web', '{"split":[{"tag":"canary","weight":20}]}');
    const w = await eventually(async () => {
      const now = await web();
      return now?.split.length ? now : undefined;
    }, 5000, 'the split in balancer.json');
    const rendered = Date.now() - started;
    assert.deepEqual(w.split, [{ name: 'canary', weight: 20 }, { name: '', weight: 80 }]);
    assert.deepEqual(Object.fromEntries(w.backends.map((b) => [b.id.split('/').pop(), b.subset])), { 'web-stable': '', 'web-canary': 'canary' });
    await eventually(() => served(w.split), 5000, 'the data plane serving the split');
    t.diagnostic(`KV put -> balancer.json with the split: ${rendered} ms; -> served by the balancer: ${Date.now() - started} ms`);
    const counts = await tally(w.address, w.port, 200);
    const got = counts.get('web-canary') ?? 0;
    t.diagnostic(`200 connections at 20%: canary ${got}, stable ${counts.get('web-stable') ?? 0}`);
    assert.equal((counts.get('web-canary') ?? 0) + (counts.get('web-stable') ?? 0), 200, `every connection answered: ${JSON.stringify([...counts])}`);
    assert.ok(Math.abs(got - 40) <= 3, `canary got ${got} of 200, expected 40 +- 3`);
    // The status screen: each subset, its weight, and the share it got.
    const report = await routesReport();
    const split = report.routes.find((r) => r.service === 'web')?.split;
    assert.deepEqual(split?.map((p) => [p.name, p.weight]), [['canary', 20], ['', 80]]);
    const total = (split ?? []).reduce((sum, p) => sum + p.connections, 0);
    assert.ok(total >= 200, `the balancer counted ${total} connections in the subsets`);
    const text = statusTable(report);
    t.diagnostic(`loopmesh status:\n${text}`);
    assert.match(text, /^web\s+canary\s+20%\s+\d+\s+(19|20|21)\.\d%$/m);
    assert.match(text, /^web\s+\(rest\)\s+80%\s+\d+\s+(79|80|81)\.\d%$/m);
  });

  test('split canary 100: every connection reaches the canary', async () => {
    await kvPut(consul, 'loopmesh/traffic/web', '{"split":[{"tag":"canary","weight":100}]}');
    await eventually(() => servedAndWritten([{ name: 'canary', weight: 100 }, { name: '', weight: 0 }]), 5000, 'the split at 100');
    const w = (await web())!;
    const counts = await tally(w.address, w.port, 50);
    assert.deepEqual([...counts], [['web-canary', 50]]);
  });

  test('the agent restarted, its KV read slower than the catalog: it never renders the service without its split', async () => {
    const file = join(node.config.runDir, 'balancer.json');
    const dir = node.dir;
    await node.stop();
    const versions: string[] = [];
    const watcher = watch(node.config.runDir, () => {
      versions.push(readFileSync(file, 'utf8'));
    });
    // The first KV read answers 1 s late (a slow link), so the catalog arrives first: the agent must
    // wait for the documents rather than render the service without its split in between.
    const kvList = ConsulClient.prototype.kvList;
    let delayed = false;
    ConsulClient.prototype.kvList = async function (this: ConsulClient, ...args: Parameters<typeof kvList>) {
      if (!delayed) {
        delayed = true;
        await new Promise((r) => setTimeout(r, 1000));
      }
      return kvList.apply(this, args);
    };
    try {
      node = await startAgent(consul.url, {}, dir);
      await eventually(() => node.agent.lastRenderAt !== undefined, 5000, 'the first render after the restart');
      await new Promise((r) => setTimeout(r, 300));
    } finally {
      ConsulClient.prototype.kvList = kvList;
      watcher.close();
    }
    assert.ok(delayed, 'the first KV read was delayed');
    versions.push(readFileSync(file, 'utf8'));
    for (const text of versions) {
      if (text === '') continue; // read in the middle of a rename
      const w = (JSON.parse(text) as { services: RenderedService[] }).services.find((s) => s.service === 'web');
      assert.deepEqual(w?.split, [{ name: 'canary', weight: 100 }, { name: '', weight: 0 }], `a render without the split: ${text}`);
    }
    assert.ok(served([{ name: 'canary', weight: 100 }, { name: '', weight: 0 }]));
  });

  test('a bad document (weight 150, then broken JSON): LM_ERR_TRAFFIC_INVALID in /v1/routes, the previous split stays, health not failing', async (t) => {
    for (const bad of ['{"split":[{"tag":"canary","weight":150}]}', '{"split":[{"tag":"canary","weight":20}']) {
      await kvPut(consul, 'loopmesh/traffic/web', bad);
      const report = await eventually(async () => {
        const r = await routesReport();
        return r.problems.some((p) => p.code === codes.trafficInvalid && p.message.includes(bad.includes('150') ? '150' : 'not valid JSON')) ? r : undefined;
      }, 5000, `the problem for ${bad}`);
      const problem = report.problems.find((p) => p.code === codes.trafficInvalid)!;
      t.diagnostic(`problem ${problem.code}: ${problem.message}`);
      assert.match(problem.message, /^Consul KV loopmesh\/traffic\/web: .*the previous document stays in force$/);
      assert.notEqual(report.health.status, 'failing', 'a bad document is not a failing node');
      assert.match(statusTable(report), /problem LM_ERR_TRAFFIC_INVALID: Consul KV loopmesh\/traffic\/web/);
      assert.deepEqual((await web())!.split, [{ name: 'canary', weight: 100 }, { name: '', weight: 0 }]);
      const w = (await web())!;
      assert.deepEqual([...(await tally(w.address, w.port, 10))], [['web-canary', 10]]);
    }
  });

  test('the key deleted: no split, both instances get connections, and the problem is gone', async () => {
    await kvDelete(consul, 'loopmesh/traffic/web');
    await eventually(() => servedAndWritten([]), 5000, 'no split');
    assert.deepEqual((await web())!.split, []);
    const w = (await web())!;
    const counts = await tally(w.address, w.port, 20);
    assert.deepEqual([...counts.keys()].sort(), ['web-canary', 'web-stable'], JSON.stringify([...counts]));
    const report = await routesReport();
    assert.equal(report.problems.filter((p) => p.code === codes.trafficInvalid).length, 0);
    assert.equal(report.routes.find((r) => r.service === 'web')?.split, undefined);
  });
});
