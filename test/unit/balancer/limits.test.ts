import { once } from 'node:events';
import { createServer, type AddressInfo } from 'node:net';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { blackHoleBackend, config, dial, freePort, service, servedBy, startBackend, startBalancer, status, type TestClient } from './tcp.js';

/** Resolves with how the connection ended: 'reset' (ECONNRESET), 'end' (a clean FIN) or 'open' after `ms`. */
function outcome(client: TestClient, ms = 2000): Promise<'reset' | 'end' | 'open'> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve('open'), ms);
    client.socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve(err.code === 'ECONNRESET' ? 'reset' : 'open');
    });
    client.socket.once('end', () => {
      clearTimeout(timer);
      resolve('end');
    });
  });
}

/** A backend that accepts and resets every connection before sending anything. */
async function resettingBackend(t: TestContext, id: string): Promise<{ id: string; address: string; port: number; accepted: () => number }> {
  let accepted = 0;
  const server = createServer((socket) => {
    accepted++;
    // A moment after accepting, so the balancer's connect has completed: a reset of a connection, not a refused connect.
    setTimeout(() => socket.resetAndDestroy(), 30);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  return { id, address: '127.0.0.1', port: (server.address() as AddressInfo).port, accepted: () => accepted };
}

test('maxConnections with no queue: the connection over the limit is reset at once, the others keep flowing', async (t) => {
  const b = await startBackend(t, 'b');
  const address = '127.66.2.1';
  const port = await freePort(address);
  const balancer = startBalancer(t, {});
  await balancer.apply(config(service('web', address, port, [b.spec], { limits: { maxConnections: 2, queue: 0 } })));
  const first = dial(t, address, port);
  const second = dial(t, address, port);
  await Promise.all([first.waitFor('b\n'), second.waitFor('b\n')]);
  const third = dial(t, address, port);
  assert.equal(await outcome(third), 'reset');
  first.socket.write('still here\n');
  await first.waitFor('still here');
  const web = status(balancer, 'web');
  assert.deepEqual([web.refusedConnections, web.activeConnections, web.limits.maxConnections], [1, 2, 2]);
});

test('maxConnections with a queue: a waiting connection is served when a slot frees; one past the queue or its timeout is reset', async (t) => {
  const b = await startBackend(t, 'b');
  const address = '127.66.2.2';
  const port = await freePort(address);
  const balancer = startBalancer(t, {});
  await balancer.apply(config(service('web', address, port, [b.spec], { limits: { maxConnections: 1, queue: 1, queueTimeoutMs: 400 } })));
  const first = dial(t, address, port);
  await first.waitFor('b\n');
  const waiting = dial(t, address, port);
  const overflow = dial(t, address, port);
  assert.equal(await outcome(overflow), 'reset', 'the queue holds one');
  assert.equal(status(balancer, 'web').queuedConnections, 1);
  assert.equal(waiting.received, '', 'not served while the slot is taken');
  first.socket.destroy();
  await waiting.waitFor('b\n');
  // Now the waiting one holds the slot; the next waits and gives up after queueTimeoutMs.
  const late = dial(t, address, port);
  const started = Date.now();
  assert.equal(await outcome(late), 'reset');
  assert.ok(Date.now() - started >= 350, `refused after the queue timeout, took ${Date.now() - started} ms`);
  assert.equal(status(balancer, 'web').refusedConnections, 2);
});

test('a limit raised by a new config lets the waiting connections in', async (t) => {
  const b = await startBackend(t, 'b');
  const address = '127.66.2.3';
  const port = await freePort(address);
  const balancer = startBalancer(t, {});
  const spec = (max: number) => service('web', address, port, [b.spec], { limits: { maxConnections: max, queue: 5, queueTimeoutMs: 3000 } });
  await balancer.apply(config(spec(1)));
  const first = dial(t, address, port);
  await first.waitFor('b\n');
  const waiting = dial(t, address, port);
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(waiting.received, '');
  await balancer.apply(config(spec(2)));
  await waiting.waitFor('b\n');
});

test('flag defaults apply where a service sets no limit', async (t) => {
  const b = await startBackend(t, 'b');
  const address = '127.66.2.4';
  const port = await freePort(address);
  const balancer = startBalancer(t, { maxConnections: 1, queue: 0 });
  await balancer.apply(config(service('web', address, port, [b.spec])));
  const first = dial(t, address, port);
  await first.waitFor('b\n');
  assert.equal(await outcome(dial(t, address, port)), 'reset');
});

test('a backend that resets before its first byte is ejected after 3 in a row; clients get a reset, not a clean close', async (t) => {
  const bad = await resettingBackend(t, 'bad');
  const good = await startBackend(t, 'good');
  const address = '127.66.2.5';
  const port = await freePort(address);
  const balancer = startBalancer(t, {});
  await balancer.apply(config(service('web', address, port, [bad, good.spec], { policy: 'round-robin' })));
  const seen: string[] = [];
  for (let i = 0; i < 12; i++) {
    const client = dial(t, address, port);
    const how = await Promise.race([client.waitFor('good\n', 2000).then(() => 'good'), outcome(client, 2000)]);
    seen.push(how);
    client.socket.destroy();
  }
  assert.equal(seen.filter((s) => s === 'reset').length, 3, `3 resets, then only the good backend: ${seen.join(',')}`);
  assert.ok(!seen.includes('end'), 'never a clean close');
  const badStatus = status(balancer, 'web').backends.find((x) => x.id === 'bad');
  assert.ok(badStatus?.ejectedUntil, 'ejected');
  assert.deepEqual([badStatus.ejectReason, badStatus.resetsBeforeFirstByte, badStatus.ejectionsTotal], ['reset', 3, 1]);
});

test('drain policy reset: a backend that leaves the set has its open connections reset at once; keep leaves them', async (t) => {
  const a = await startBackend(t, 'a');
  const b = await startBackend(t, 'b');
  for (const [drain, expected] of [['reset', 'reset'], ['keep', 'open']] as const) {
    const address = drain === 'reset' ? '127.66.2.6' : '127.66.2.7';
    const port = await freePort(address);
    const balancer = startBalancer(t, {});
    const limits = { drain };
    await balancer.apply(config(service('web', address, port, [a.spec], { limits })));
    const client = dial(t, address, port);
    await client.waitFor('a\n');
    await balancer.apply(config(service('web', address, port, [b.spec], { limits })));
    assert.equal(await outcome(client, 500), expected, drain);
    assert.equal(await servedBy(t, address, port), 'b');
  }
});

test('split through real sockets: 20% to the canary subset, and status shows the split with the shares', async (t) => {
  const old = await startBackend(t, 'old');
  const canary = await startBackend(t, 'canary');
  const address = '127.66.2.8';
  const port = await freePort(address);
  const balancer = startBalancer(t, {});
  await balancer.apply(config(service('web', address, port, [{ ...old.spec, subset: '' }, { ...canary.spec, subset: 'canary' }], {
    split: [{ name: 'canary', weight: 20 }, { name: '', weight: 80 }],
  })));
  const served: string[] = [];
  for (let i = 0; i < 50; i++) served.push(await servedBy(t, address, port));
  assert.equal(served.filter((s) => s === 'canary').length, 10);
  assert.deepEqual(status(balancer, 'web').split, [{ name: 'canary', weight: 20, connections: 10 }, { name: '', weight: 80, connections: 40 }]);
});

test('per-service connectTimeoutMs from the spec overrides the flag default', async (t) => {
  const address = '127.66.2.9';
  const port = await freePort(address);
  const balancer = startBalancer(t, { connectTimeoutMs: 5000 });
  const hole = await blackHoleBackend(t, 'hole');
  await balancer.apply(config(service('web', address, port, [hole], { limits: { connectTimeoutMs: 300 } })));
  const client = dial(t, address, port);
  const started = Date.now();
  await client.hungUp;
  assert.ok(Date.now() - started < 2000, `closed within the service's 300 ms, not the 5 s default: ${Date.now() - started} ms`);
  assert.equal(status(balancer, 'web').limits.connectTimeoutMs, 300);
});
