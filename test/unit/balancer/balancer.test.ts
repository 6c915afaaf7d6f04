import { once } from 'node:events';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Balancer } from '../../../agent/balancer/balancer.js';
import { silentLogger } from '../../../agent/log.js';
import { blackHoleBackend, config, deadBackend, dial, freePort, service, servedBy, startBackend, stillPending, waitUntil , startBalancer, status } from './tcp.js';


/** Resolves with the error code of a connection attempt that fails, or 'connected'. */
async function tryConnect(address: string, port: number): Promise<string> {
  const socket: Socket = connect({ host: address, port });
  try {
    await once(socket, 'connect');
    return 'connected';
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? 'error';
  } finally {
    socket.destroy();
  }
}

test('round-robin reaches every backend in turn', async (t) => {
  const a = await startBackend(t, 'a');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.1';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  const result = await balancer.apply(config(service('web', address, port, [a.spec, b.spec])));
  assert.deepEqual(result, { added: ['web'], removed: [], updated: [], failed: [] });

  const served: string[] = [];
  for (let i = 0; i < 4; i++) served.push(await servedBy(t, address, port));
  assert.deepEqual(served, ['a', 'b', 'a', 'b']);

  const web = status(balancer, 'web');
  assert.equal(web.listening, true);
  assert.equal(web.totalConnections, 4);
  assert.deepEqual(web.backends.map((x) => [x.id, x.totalConnections]), [['a', 2], ['b', 2]]);
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'connections to end');
});

test('forwards both ways with half-close', async (t) => {
  const a = await startBackend(t, 'a');
  const address = '127.66.0.2';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [a.spec])));

  const client = dial(t, address, port);
  await client.waitFor('a\n');
  client.socket.end('ping\n');
  // The backend answers after the client's end, which only arrives if the end was propagated.
  await client.waitFor('bye a\n');
  await client.waitForEnd();
  assert.equal(client.received, 'a\nping\nbye a\n');
  await client.hungUp;
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'connection to be released');
  assert.equal(status(balancer, 'web').backends[0]?.activeConnections, 0);
});

test('many concurrent sessions all complete and every counter returns to zero', async (t) => {
  const a = await startBackend(t, 'a');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.23';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [a.spec, b.spec])));

  const clients = Array.from({ length: 50 }, (_, i) => {
    const client = dial(t, address, port);
    client.socket.end(`message ${i}\n`);
    return client;
  });
  await Promise.all(clients.map((client) => client.waitForEnd(5000)));
  clients.forEach((client, i) => assert.match(client.received, new RegExp(`^[ab]\nmessage ${i}\nbye [ab]\n$`)));
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'every connection to be released');
  const web = status(balancer, 'web');
  assert.equal(web.totalConnections, 50);
  assert.deepEqual(web.backends.map((x) => [x.totalConnections, x.activeConnections]), [[25, 0], [25, 0]]);
});

test('a refused backend is retried on the next one and the client still gets an answer', async (t) => {
  const dead = await deadBackend('dead');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.3';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [dead, b.spec])));

  assert.equal(await servedBy(t, address, port), 'b');
  const web = status(balancer, 'web');
  assert.equal(web.retries, 1);
  assert.equal(web.failedConnections, 0);
  assert.deepEqual(web.backends.map((x) => [x.id, x.failedConnects, x.totalConnections]), [['dead', 1, 0], ['b', 0, 1]]);
});

test('when every backend fails the client connection is closed and counted', async (t) => {
  const address = '127.66.0.4';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [await deadBackend('x'), await deadBackend('y')])));

  const client = dial(t, address, port);
  await client.hungUp;
  assert.equal(client.received, '');
  const web = status(balancer, 'web');
  assert.equal(web.failedConnections, 1);
  assert.equal(web.retries, 1, 'the second backend was tried once, then the balancer gave up');
  assert.deepEqual(web.backends.map((x) => x.failedConnects), [1, 1]);
  assert.equal(web.activeConnections, 0);
});

test('bytes the client sends before the backend is connected are not lost', async (t) => {
  const hole = await blackHoleBackend(t, 'hole');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.5';
  const port = await freePort(address);
  const balancer = startBalancer(t, { connectTimeoutMs: 200 });
  await balancer.apply(config(service('web', address, port, [hole, b.spec])));

  // Sent and ended at once, while the balancer waits 200 ms on the first backend.
  const payload = 'x'.repeat(1024 * 1024);
  const client = dial(t, address, port);
  client.socket.end(payload);
  await client.waitFor('bye b\n', 10000);
  assert.equal(client.received, `b\n${payload}bye b\n`);
  assert.equal(status(balancer, 'web').retries, 1);
});

test('a removed backend gets no new connections while an open one keeps exchanging data', async (t) => {
  const a = await startBackend(t, 'a');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.6';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [a.spec, b.spec])));

  const open = dial(t, address, port);
  await open.waitFor('a\n');

  const result = await balancer.apply(config(service('web', address, port, [b.spec])));
  assert.deepEqual(result, { added: [], removed: [], updated: ['web'], failed: [] });
  for (let i = 0; i < 3; i++) assert.equal(await servedBy(t, address, port), 'b');
  assert.equal(a.connections, 1);
  assert.deepEqual(status(balancer, 'web').backends.map((x) => x.id), ['b']);

  open.socket.write('still here\n');
  await open.waitFor('still here\n');
  assert.equal(open.received, 'a\nstill here\n');
});

test('an apply that only changes backends keeps the same listener', async (t) => {
  const a = await startBackend(t, 'a');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.7';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [a.spec])));
  const before = balancer.listenerOf('web');
  assert.ok(before?.listening);

  await balancer.apply(config(service('web', address, port, [b.spec])));
  assert.equal(balancer.listenerOf('web'), before);
  assert.ok(before.listening);
  assert.equal(await servedBy(t, address, port), 'b');

  const same = await balancer.apply(config(service('web', address, port, [b.spec])));
  assert.deepEqual(same, { added: [], removed: [], updated: [], failed: [] });
  assert.equal(balancer.listenerOf('web'), before);
});

test('a removed service stops accepting; its open connection flows until the drain deadline', async (t) => {
  const a = await startBackend(t, 'a');
  const address = '127.66.0.8';
  const port = await freePort(address);
  const balancer = startBalancer(t, { drainTimeoutMs: 400 });
  await balancer.apply(config(service('web', address, port, [a.spec])));

  const open = dial(t, address, port);
  await open.waitFor('a\n');

  const removedAt = Date.now();
  const result = await balancer.apply(config());
  assert.deepEqual(result.removed, ['web']);
  assert.deepEqual(balancer.snapshot(), []);
  assert.equal(await tryConnect(address, port), 'ECONNREFUSED');

  open.socket.write('after removal\n');
  await open.waitFor('after removal\n');
  await open.hungUp;
  const elapsed = Date.now() - removedAt;
  assert.ok(elapsed >= 350 && elapsed < 3000, `cut at the 400 ms drain deadline, after ${elapsed} ms`);
  assert.equal(open.received, 'a\nafter removal\n');
});

test('a service whose address and port change listens on the new one and drains the old', async (t) => {
  const a = await startBackend(t, 'a');
  const address = '127.66.0.9';
  const [oldPort, newPort] = [await freePort(address), await freePort('127.66.0.10')];
  const balancer = startBalancer(t, { drainTimeoutMs: 5000 });
  await balancer.apply(config(service('web', address, oldPort, [a.spec])));
  const open = dial(t, address, oldPort);
  await open.waitFor('a\n');

  const result = await balancer.apply(config(service('web', '127.66.0.10', newPort, [a.spec])));
  assert.deepEqual(result, { added: [], removed: [], updated: ['web'], failed: [] });
  assert.equal(await servedBy(t, '127.66.0.10', newPort), 'a');
  assert.equal(await tryConnect(address, oldPort), 'ECONNREFUSED');
  open.socket.write('moved\n');
  await open.waitFor('moved\n');
  assert.equal(status(balancer, 'web').activeConnections, 1);
});

test('a port in use fails that service only; a later apply retries it', async (t) => {
  const a = await startBackend(t, 'a');
  const taken = '127.66.0.11';
  const takenPort = await freePort(taken);
  const blocker = createServer();
  blocker.listen(takenPort, taken);
  await once(blocker, 'listening');
  t.after(() => blocker.close());
  const free = '127.66.0.12';
  const freePortNumber = await freePort(free);
  const balancer = startBalancer(t);

  const wanted = config(service('blocked', taken, takenPort, [a.spec]), service('web', free, freePortNumber, [a.spec]));
  const first = await balancer.apply(wanted);
  assert.deepEqual(first.added, ['web']);
  assert.equal(first.failed.length, 1);
  assert.equal(first.failed[0]?.service, 'blocked');
  assert.equal(first.failed[0]?.code, 'LM_ERR_BALANCER_LISTEN');
  assert.match(first.failed[0]?.message ?? '', new RegExp(`${taken}:${takenPort}.*EADDRINUSE`));
  assert.equal(status(balancer, 'blocked').listening, false);
  assert.equal(await servedBy(t, free, freePortNumber), 'a');

  blocker.close();
  await once(blocker, 'close');
  const second = await balancer.apply(wanted);
  assert.deepEqual(second, { added: ['blocked'], removed: [], updated: [], failed: [] });
  assert.equal(await servedBy(t, taken, takenPort), 'a');
});

test('two services that swap addresses both serve after the apply', async (t) => {
  const a = await startBackend(t, 'a');
  const b = await startBackend(t, 'b');
  const [x, y] = ['127.66.0.20', '127.66.0.21'];
  const port = await freePort(x, y);
  const balancer = startBalancer(t, { drainTimeoutMs: 200 });
  await balancer.apply(config(service('one', x, port, [a.spec]), service('two', y, port, [b.spec])));
  assert.equal(await servedBy(t, x, port), 'a');

  const result = await balancer.apply(config(service('one', y, port, [a.spec]), service('two', x, port, [b.spec])));
  assert.deepEqual(result.failed, []);
  assert.deepEqual(result.updated.sort(), ['one', 'two']);
  assert.equal(await servedBy(t, x, port), 'b');
  assert.equal(await servedBy(t, y, port), 'a');
  assert.deepEqual(balancer.snapshot().map((s) => s.listening), [true, true]);
});

test('a backend that resets the connection takes the client connection down, and nothing crashes', async (t) => {
  const resetting = createServer((socket) => socket.once('data', () => socket.resetAndDestroy()));
  resetting.listen(0, '127.0.0.1');
  await once(resetting, 'listening');
  t.after(() => resetting.close());
  const backendPort = (resetting.address() as AddressInfo).port;
  const address = '127.66.0.22';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [{ id: 'r', address: '127.0.0.1', port: backendPort }])));

  const client = dial(t, address, port);
  client.socket.write('hello');
  await client.hungUp;
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'the connection to be released');
  assert.equal(status(balancer, 'web').backends[0]?.activeConnections, 0);

  // A client that resets while the balancer is still connecting is cleaned up as well.
  const early = connect({ host: address, port });
  early.on('error', () => undefined);
  await once(early, 'connect');
  early.resetAndDestroy();
  await waitUntil(() => status(balancer, 'web').totalConnections === 2 && status(balancer, 'web').activeConnections === 0, 'the reset client to be released');
});

test("empty 'reject' keeps listening and closes new connections", async (t) => {
  const a = await startBackend(t, 'a');
  const address = '127.66.0.13';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [a.spec], { empty: 'reject' })));
  await balancer.apply(config(service('web', address, port, [], { empty: 'reject' })));

  const client = dial(t, address, port);
  await client.hungUp;
  assert.equal(client.received, '');
  const web = status(balancer, 'web');
  assert.equal(web.listening, true);
  assert.deepEqual(web.backends, []);
  assert.equal(web.failedConnections, 1);
  assert.equal(a.connections, 0);
});

test("empty 'keep-last' keeps serving the previous backends", async (t) => {
  const a = await startBackend(t, 'a');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.14';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [a.spec], { empty: 'keep-last' })));
  await balancer.apply(config(service('web', address, port, [], { empty: 'keep-last' })));

  assert.equal(await servedBy(t, address, port), 'a');
  let web = status(balancer, 'web');
  assert.equal(web.keptLast, true);
  assert.deepEqual(web.backends.map((x) => x.id), ['a']);
  assert.equal(web.failedConnections, 0);

  await balancer.apply(config(service('web', address, port, [b.spec], { empty: 'keep-last' })));
  assert.equal(await servedBy(t, address, port), 'b');
  web = status(balancer, 'web');
  assert.equal(web.keptLast, false);
});

test("'keep-last' with nothing to keep rejects", async (t) => {
  const address = '127.66.0.15';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [], { empty: 'keep-last' })));
  const client = dial(t, address, port);
  await client.hungUp;
  assert.equal(status(balancer, 'web').failedConnections, 1);
});

test('a backend that never answers times out and the next one serves', async (t) => {
  const hole = await blackHoleBackend(t, 'hole');
  const b = await startBackend(t, 'b');
  const address = '127.66.0.16';
  const port = await freePort(address);
  const balancer = startBalancer(t, { connectTimeoutMs: 200 });
  await balancer.apply(config(service('web', address, port, [hole, b.spec])));

  const started = Date.now();
  assert.equal(await servedBy(t, address, port), 'b');
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 190, `waited for the 200 ms connect timeout, took ${elapsed} ms`);
  const web = status(balancer, 'web');
  assert.equal(web.retries, 1);
  assert.deepEqual(web.backends.map((x) => [x.id, x.failedConnects]), [['hole', 1], ['b', 0]]);
});

test('close stops listeners and cuts open connections', async (t) => {
  const a = await startBackend(t, 'a');
  const address = '127.66.0.17';
  const port = await freePort(address);
  const balancer = new Balancer({ logger: silentLogger() });
  t.after(() => balancer.close());
  await balancer.apply(config(service('web', address, port, [a.spec])));
  const open = dial(t, address, port);
  await open.waitFor('a\n');

  const closing = balancer.close();
  assert.equal(await stillPending(closing, 2000), false);
  await open.hungUp;
  assert.equal(await tryConnect(address, port), 'ECONNREFUSED');
  await assert.rejects(balancer.apply(config()));
});
