import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Agent } from '../../agent/agent.js';
import { makeCerts, TestConsul, type TestConsulCerts } from '../support/consul.js';
import { removeDir, startAgent } from '../support/agent.js';
import { captureLogger } from '../support/log.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { sleep } from '../../agent/sleep.js';

type Node = Awaited<ReturnType<typeof startAgent>>;

const served = (agent: Agent, service: string) => agent.dataPlane?.config()?.services.find((s) => s.service === service);

describe('TLS to a real Consul that speaks only HTTPS and wants client certificates', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let certs: TestConsulCerts;
  let otherCa: TestConsulCerts;
  let backend: IdServer;
  const nodes: Node[] = [];
  const dirs: string[] = [];

  before(async () => {
    consul = await TestConsul.start({ tls: true });
    certs = consul.certs!;
    const other = await mkdtemp(join(tmpdir(), 'loopmesh-other-ca-'));
    dirs.push(other);
    otherCa = await makeCerts(other);
    backend = await startIdServer('tls-web-a');
    await consul.register({ id: backend.id, name: 'tls-web', port: backend.port, meta: { 'loopmesh-port': String(await freePort()) }, ttlCheck: { passing: true } });
  });

  after(async () => {
    await Promise.all(nodes.map((n) => n.stop().catch(() => undefined)));
    await backend?.close();
    await consul?.close();
    await Promise.all([...dirs, ...nodes.map((n) => n.dir)].map(removeDir));
  });

  test('with the CA, a client certificate and the server name, the agent routes the service', async () => {
    assert.match(consul.url, /^https:\/\//);
    const log = captureLogger('debug');
    const node = await startAgent(consul.url, { caFile: certs.ca, clientCert: certs.clientCert, clientKey: certs.clientKey, tlsServerName: 'server.dc1.consul' }, undefined, log.logger);
    nodes.push(node);
    const route = await eventually(() => served(node.agent, 'tls-web'), 20_000, 'tls-web routed over TLS');
    assert.equal(await whoAnswers(route.address, route.port), 'tls-web-a');
    assert.equal(node.agent.watcher.status().connected, true);
    assert.equal(log.lines.filter((l) => l.code === 'LM_ERR_CONSUL_TLS').length, 0, log.text());
  });

  test('a wrong CA, no client certificate, a wrong server name, plain HTTP: never a route, LM_ERR_CONSUL_TLS naming the cause, never plain HTTP', async () => {
    const cases: { what: string; url: string; overrides: Record<string, string>; cause: RegExp }[] = [
      { what: 'wrong CA', url: consul.url, overrides: { caFile: otherCa.ca, clientCert: certs.clientCert, clientKey: certs.clientKey }, cause: /is not signed by the CA in --ca-file ".*loopmesh-other-ca-\w+\/consul-agent-ca\.pem" \(UNABLE_TO_VERIFY_LEAF_SIGNATURE/ },
      { what: 'no client certificate', url: consul.url, overrides: { caFile: certs.ca }, cause: /asks for a client certificate \(verify_incoming\) and none is set; set --client-cert and --client-key/ },
      { what: 'wrong server name', url: consul.url, overrides: { caFile: certs.ca, clientCert: certs.clientCert, clientKey: certs.clientKey, tlsServerName: 'wrong.example' }, cause: /does not hold --tls-server-name "wrong\.example"/ },
      { what: 'plain HTTP to the HTTPS port', url: consul.url.replace('https:', 'http:'), overrides: {}, cause: /only answers HTTPS; use an https:\/\/ address or --consul-ssl/ },
    ];
    const started = await Promise.all(
      cases.map(async (c) => {
        const log = captureLogger('debug');
        const node = await startAgent(c.url, c.overrides, undefined, log.logger);
        nodes.push(node);
        return { ...c, node, log };
      }),
    );
    await Promise.all(started.map((c) => eventually(() => c.node.agent.watcher.status().lastError?.code === 'LM_ERR_CONSUL_TLS', 15_000, `${c.what}: LM_ERR_CONSUL_TLS`)));
    // The good agent above routed within a second or two; give these as long again and more.
    await sleep(3000);
    for (const { what, node, log, cause } of started) {
      const status = node.agent.watcher.status();
      assert.equal(node.agent.routes().length, 0, `${what}: no route`);
      assert.equal(served(node.agent, 'tls-web'), undefined, `${what}: nothing served`);
      assert.equal(status.connected, false, what);
      assert.deepEqual(Object.keys(status.errors), ['LM_ERR_CONSUL_TLS'], `${what}: every failure was a TLS failure (nothing answered over plain HTTP)`);
      assert.match(status.lastError?.message ?? '', cause, what);
      const health = node.agent.health();
      assert.equal(health.status, 'degraded', what);
      assert.equal(health.reasons[0]?.code, 'LM_ERR_CONSUL_TLS', what);
      const warned = log.lines.filter((l) => l.code === 'LM_ERR_CONSUL_TLS' && l.level === 40);
      assert.ok(warned.length >= 1, `${what}: warned: ${log.text()}`);
      for (const line of warned) assert.match(line.msg, cause, what);
    }
  });
});
