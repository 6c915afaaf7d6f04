import { once } from 'node:events';
import { createHash, randomBytes } from 'node:crypto';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { forwardBoth, maxBufferedBytes, pooledReads } from '../../../agent/balancer/forward.js';

/**
 * Two real TCP pairs on loopback joined by forwardBoth, as the balancer joins them:
 *   client ──TCP── [clientSide ⇄ forwardBoth ⇄ upstreamSide] ──TCP── backend
 * clientSide is paused before forwarding starts, as connection.ts leaves it while it dials.
 */
/** The pooled reads of the pair set up last (for a test to hook onFirstBytes before forwarding). */
let lastReads: ReturnType<typeof pooledReads> | undefined;

interface PairOptions {
  /** The upstream reads into pooled buffers (net.connect's onread), as connection.ts may dial it. */
  pooled?: boolean;
  /** Runs after both connections are up and before forwardBoth. */
  beforeForward?: (client: Socket, clientSide: Socket, backend: Socket) => Promise<void>;
}

async function forwardedPair(t: TestContext, options: PairOptions = {}): Promise<{ client: Socket; backend: Socket; clientSide: Socket; upstreamSide: Socket }> {
  const servers: Server[] = [];
  const sockets: Socket[] = [];
  t.after(() => {
    for (const s of sockets) s.destroy();
    for (const s of servers) s.close();
  });
  const accept = async (): Promise<{ port: number; accepted: Promise<Socket> }> => {
    const server = createServer({ allowHalfOpen: true });
    servers.push(server);
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const accepted = once(server, 'connection').then(([s]) => {
      sockets.push(s as Socket);
      return s as Socket;
    });
    return { port: (server.address() as AddressInfo).port, accepted };
  };
  const front = await accept();
  const back = await accept();
  const client = connect({ host: '127.0.0.1', port: front.port, allowHalfOpen: true });
  sockets.push(client);
  const clientSide = await front.accepted;
  clientSide.pause();
  const reads = options.pooled ? pooledReads() : undefined;
  lastReads = reads;
  const upstreamSide = connect({ host: '127.0.0.1', port: back.port, allowHalfOpen: true, ...(reads ? { onread: reads.onread } : {}) });
  sockets.push(upstreamSide);
  const backend = await back.accepted;
  await once(upstreamSide, 'connect');
  for (const s of [client, clientSide, upstreamSide, backend]) s.on('error', (err) => assert.fail(`socket error: ${String(err)}`));
  await options.beforeForward?.(client, clientSide, backend);
  forwardBoth(clientSide, upstreamSide, reads);
  return { client, backend, clientSide, upstreamSide };
}

/** Writes `data` in pieces of varied sizes (1 byte to 200 KiB) honouring backpressure, then ends. */
async function send(socket: Socket, data: Buffer): Promise<void> {
  let at = 0;
  let i = 0;
  const sizes = [1, 7, 1500, 65536, 200_000, 13, 4096];
  while (at < data.length) {
    const n = Math.min(sizes[i++ % sizes.length]!, data.length - at);
    if (!socket.write(data.subarray(at, at + n))) await once(socket, 'drain');
    at += n;
  }
  socket.end();
}

/** Reads until the peer's end; resolves with the sha256 and length of what came. */
function receive(socket: Socket): Promise<{ sha: string; bytes: number }> {
  return new Promise((resolve) => {
    const hash = createHash('sha256');
    let bytes = 0;
    socket.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      bytes += chunk.length;
    });
    socket.once('end', () => resolve({ sha: hash.digest('hex'), bytes }));
  });
}

function sha(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

for (const pooled of [false, true]) {
const mode = pooled ? ' (upstream read into pooled buffers)' : '';

test(`forwardBoth moves several MB both ways intact and in order, with half-close each way${mode}`, { timeout: 30_000 }, async (t) => {
  const { client, backend, clientSide, upstreamSide } = await forwardedPair(t, { pooled });
  const up = randomBytes(8 * 1024 * 1024 + 17);
  const down = randomBytes(6 * 1024 * 1024 + 5);
  const atBackend = receive(backend);
  const atClient = receive(client);
  // Both directions at once; the client ends first and the backend keeps sending after that.
  const upSent = send(client, up);
  await upSent;
  await send(backend, down);
  const [b, c] = await Promise.all([atBackend, atClient]);
  assert.equal(b.bytes, up.length);
  assert.equal(b.sha, sha(up));
  assert.equal(c.bytes, down.length);
  assert.equal(c.sha, sha(down));
  // Half-close went through both ways: each forwarding socket ended its writing side.
  assert.equal(upstreamSide.writableEnded, true);
  assert.equal(clientSide.writableEnded, true);
});

test(`an end from the client reaches the backend while the backend can still answer (half-close)${mode}`, { timeout: 15_000 }, async (t) => {
  const { client, backend } = await forwardedPair(t, { pooled });
  backend.setEncoding('utf8');
  let got = '';
  backend.on('data', (s: string) => (got += s));
  client.end('question');
  await once(backend, 'end');
  assert.equal(got, 'question');
  const reply = receive(client);
  backend.end('answer after the client ended');
  const r = await reply;
  assert.equal(r.sha, sha(Buffer.from('answer after the client ended')));
});

test(`bytes and an end the client sent while the backend was being dialed still reach the backend${mode}`, { timeout: 15_000 }, async (t) => {
  const { backend } = await forwardedPair(t, { pooled, beforeForward: async (client, clientSide) => {
    client.end('sent early');
    // net emits 'end' on the paused socket once the FIN is read and nothing is buffered; with bytes
    // buffered it waits for them to be read. Either way forwarding must pass both on.
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(clientSide.writableEnded, false);
  } });
  const got = await receive(backend);
  assert.equal(got.sha, sha(Buffer.from('sent early')));
});

test(`an end alone (no bytes) the client sent while the backend was being dialed reaches the backend${mode}`, { timeout: 15_000 }, async (t) => {
  const { backend, upstreamSide } = await forwardedPair(t, { pooled, beforeForward: async (client, clientSide) => {
    client.end();
    await once(clientSide, 'end');
  } });
  const got = await receive(backend);
  assert.equal(got.bytes, 0);
  assert.equal(upstreamSide.writableEnded, true);
});

test(`a backend that does not read holds the forwarding buffer bounded, and everything arrives once it reads${mode}`, { timeout: 30_000 }, async (t) => {
  const { client, backend, upstreamSide } = await forwardedPair(t, { pooled });
  backend.pause();
  const data = randomBytes(32 * 1024 * 1024);
  let clientBlocked = false;
  // The client writes as fast as the path takes it; with nobody reading, it must stall.
  const writing = (async () => {
    let at = 0;
    while (at < data.length) {
      const n = Math.min(256 * 1024, data.length - at);
      if (!client.write(data.subarray(at, at + n))) {
        clientBlocked = true;
        await once(client, 'drain');
      }
      at += n;
    }
    client.end();
  })();
  let maxHeld = 0;
  const deadline = Date.now() + 1500;
  while (Date.now() < deadline) {
    maxHeld = Math.max(maxHeld, upstreamSide.writableLength);
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.equal(clientBlocked, true, 'the client never saw backpressure: the forwarder buffered everything');
  // One read (up to 64 KiB, more only if the kernel hands more) may land past the threshold.
  assert.ok(maxHeld <= maxBufferedBytes + 256 * 1024, `the forwarder held ${maxHeld} bytes for a reader that does not read`);
  const got = receive(backend);
  backend.resume();
  await writing;
  const r = await got;
  assert.equal(r.bytes, data.length);
  assert.equal(r.sha, sha(data));
});

test(`a client that does not read holds the forwarding buffer bounded, and everything arrives once it reads${mode}`, { timeout: 30_000 }, async (t) => {
  const { client, backend, clientSide } = await forwardedPair(t, { pooled });
  client.pause();
  const data = randomBytes(32 * 1024 * 1024);
  const writing = send(backend, data);
  let maxHeld = 0;
  const deadline = Date.now() + 1500;
  while (Date.now() < deadline) {
    maxHeld = Math.max(maxHeld, clientSide.writableLength);
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.ok(maxHeld > 0, 'nothing was ever held: the test did not load the path');
  assert.ok(maxHeld <= maxBufferedBytes + 256 * 1024, `the forwarder held ${maxHeld} bytes for a client that does not read`);
  const got = receive(client);
  client.resume();
  await writing;
  const r = await got;
  assert.equal(r.bytes, data.length);
  assert.equal(r.sha, sha(data));
});
}

test('bytes a backend sends before forwarding starts (it speaks first) reach the client, pooled reads', { timeout: 15_000 }, async (t) => {
  const { client } = await forwardedPair(t, {
    pooled: true,
    beforeForward: async (_client, _clientSide, backend) => {
      backend.write('220 greeting\r\n');
      await new Promise((r) => setTimeout(r, 200));
    },
  });
  client.setEncoding('utf8');
  const [first] = (await once(client, 'data')) as [string];
  assert.equal(first, '220 greeting\r\n');
});

test('pooled reads tell once when the backend sent its first bytes (an onread socket emits no data events)', { timeout: 15_000 }, async (t) => {
  let firstBytes = 0;
  let readsRef: ReturnType<typeof pooledReads> | undefined;
  const { client, backend } = await forwardedPair(t, {
    pooled: true,
    beforeForward: async () => {
      readsRef = lastReads;
      readsRef?.onFirstBytes(() => firstBytes++);
    },
  });
  assert.ok(readsRef);
  assert.equal(firstBytes, 0);
  const got = receive(client);
  backend.write('one');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(firstBytes, 1);
  backend.end('two');
  assert.equal((await got).bytes, 6);
  assert.equal(firstBytes, 1);
});

test('pooled reads of several backends at once share one read buffer and never mix their bytes', { timeout: 30_000 }, async (t) => {
  const pairs = await Promise.all(Array.from({ length: 4 }, () => forwardedPair(t, { pooled: true })));
  // Large and small reads interleaved across the pairs (each read is copied out of the shared buffer).
  const data = pairs.map((_, i) => randomBytes(3 * 1024 * 1024 + i * 4099));
  const got = pairs.map((p) => receive(p.client));
  await Promise.all(pairs.map((p, i) => send(p.backend, data[i]!)));
  const results = await Promise.all(got);
  results.forEach((r, i) => {
    assert.equal(r.bytes, data[i]!.length);
    assert.equal(r.sha, sha(data[i]!));
  });
});
