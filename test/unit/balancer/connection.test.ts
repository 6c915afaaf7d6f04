import { once } from 'node:events';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { defaultOutlier } from '../../../agent/balancer/backend-pool.js';
import { blackHoleBackend, config, dial, freePort, service, servedBy, startBackend, stillPending, waitUntil , startBalancer, status } from './tcp.js';


/** A backend that accepts, reads, and never sends a byte nor closes; counts the connections whose peer went away. */
async function silentBackend(t: TestContext): Promise<{ port: number; sockets: Socket[]; closed: () => number }> {
  const sockets: Socket[] = [];
  let closed = 0;
  const server: Server = createServer({ allowHalfOpen: true }, (socket) => {
    sockets.push(socket);
    let gone = false;
    const peerGone = (): void => {
      if (!gone) closed++;
      gone = true;
    };
    socket.on('error', peerGone);
    socket.on('end', peerGone);
    socket.resume();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  return { port: (server.address() as AddressInfo).port, sockets, closed: () => closed };
}

const spec = (id: string, port: number) => ({ id, address: '127.0.0.1', port });
const ejectAfterFailures = defaultOutlier.consecutiveFailures;

test('a black-holed backend costs the connect timeout only until it is ejected; the status shows it', async (t) => {
  const hole = await blackHoleBackend(t, 'hole');
  const b = await startBackend(t, 'b');
  const address = '127.66.1.1';
  const port = await freePort(address);
  const balancer = startBalancer(t, { connectTimeoutMs: 200 });
  await balancer.apply(config(service('web', address, port, [hole, b.spec])));

  let slow = 0;
  for (let i = 0; i < 12; i++) {
    const started = Date.now();
    assert.equal(await servedBy(t, address, port), 'b');
    if (Date.now() - started >= 190) slow++;
  }
  assert.equal(slow, ejectAfterFailures, `only the failures up to the ejection paid the timeout, saw ${slow} of 12`);
  const web = status(balancer, 'web');
  const holeStatus = web.backends.find((x) => x.id === 'hole');
  assert.ok(holeStatus);
  assert.equal(holeStatus.failedConnects, ejectAfterFailures);
  assert.equal(holeStatus.consecutiveFailures, ejectAfterFailures);
  assert.ok(holeStatus.ejectedUntil && Date.parse(holeStatus.ejectedUntil) > Date.now(), `ejectedUntil shown: ${holeStatus.ejectedUntil}`);
  assert.equal(web.retries, ejectAfterFailures);
});

test('a backend that accepts and never answers is closed on both sides after the idle timeout', async (t) => {
  const silent = await silentBackend(t);
  const address = '127.66.1.2';
  const port = await freePort(address);
  const balancer = startBalancer(t, { idleTimeoutMs: 300 });
  await balancer.apply(config(service('web', address, port, [spec('silent', silent.port)])));

  const client = dial(t, address, port);
  client.socket.write('anyone there?');
  const started = Date.now();
  await client.hungUp;
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 250 && elapsed < 2000, `closed after the 300 ms idle timeout, took ${elapsed} ms`);
  await waitUntil(() => silent.closed() === 1, 'the backend side to be closed too');
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'the connection to be released');
});

test('a client that half-closes to a backend that never answers: the pair ends within the idle timeout', async (t) => {
  const silent = await silentBackend(t);
  const address = '127.66.1.3';
  const port = await freePort(address);
  const balancer = startBalancer(t, { idleTimeoutMs: 300 });
  await balancer.apply(config(service('web', address, port, [spec('silent', silent.port)])));

  const client = dial(t, address, port);
  await waitUntil(() => silent.sockets.length === 1, 'the backend to accept');
  client.socket.end('last words');
  await client.hungUp;
  await waitUntil(() => silent.closed() === 1, 'the backend side to be closed', 2000);
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'the connection to be released');

  // A client that is gone entirely (FIN and close) ends the same way.
  const gone = connect({ host: address, port });
  gone.on('error', () => undefined);
  await once(gone, 'connect');
  await waitUntil(() => silent.sockets.length === 2, 'the backend to accept the second');
  gone.destroy();
  await waitUntil(() => silent.closed() === 2, 'the second backend side to be closed', 2000);
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'the second connection to be released');
});

test('bytes in either direction keep a connection open past the idle timeout', async (t) => {
  const b = await startBackend(t, 'b');
  const address = '127.66.1.4';
  const port = await freePort(address);
  const balancer = startBalancer(t, { idleTimeoutMs: 300 });
  await balancer.apply(config(service('web', address, port, [b.spec])));

  const client = dial(t, address, port);
  await client.waitFor('b\n');
  // Client to backend only: the echo flows back, so this also counts backend-to-client bytes.
  const ticker = setInterval(() => client.socket.write('.'), 100);
  t.after(() => clearInterval(ticker));
  assert.equal(await stillPending(client.hungUp, 1000), true, 'still open after 1 s of traffic');
  clearInterval(ticker);
  await client.hungUp;
});

test('a backend reset reaches the client as a reset, not a clean close', async (t) => {
  const resetting = createServer((socket) => socket.once('data', () => socket.resetAndDestroy()));
  resetting.listen(0, '127.0.0.1');
  await once(resetting, 'listening');
  t.after(() => resetting.close());
  const address = '127.66.1.5';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [spec('r', (resetting.address() as AddressInfo).port)])));

  const socket = connect({ host: address, port });
  t.after(() => socket.destroy());
  await once(socket, 'connect');
  let ended = false;
  socket.on('end', () => (ended = true));
  socket.write('hello');
  const [err] = (await once(socket, 'error')) as [NodeJS.ErrnoException];
  assert.equal(err.code, 'ECONNRESET');
  assert.equal(ended, false, 'no clean end before the reset');
  await waitUntil(() => status(balancer, 'web').activeConnections === 0, 'the connection to be released');
});
