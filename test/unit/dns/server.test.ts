import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { connect, type Socket } from 'node:net';
import { promisify } from 'node:util';
import type { ServiceSpec } from '../../../agent/contract/balancer-config.js';
import { DnsServer, type DnsServerOptions } from '../../../agent/dns/server.js';
import { FrameReader, frame } from '../../../agent/dns/tcp-frames.js';
import { DnsError } from '../../../agent/errors.js';
import { silentLogger } from '../../../agent/log.js';
import { captureLogger } from '../../support/log.js';
import { eventually } from '../../support/net.js';
import { buildQuery, parseResponse, prng, randomBytes, withHeader } from './wire.js';

const run = promisify(execFile);
const web: ServiceSpec = { service: 'web', name: 'web', fqdn: 'web.local', address: '127.77.0.2', port: 80, policy: 'round-robin', empty: 'reject', backends: [] };

async function startServer(t: TestContext, options: Partial<DnsServerOptions> = {}): Promise<{ server: DnsServer; port: number }> {
  const server = new DnsServer({ host: '127.0.0.1', port: 0, logger: silentLogger(), suffix: 'local', ...options });
  t.after(() => server.close());
  await server.start();
  server.setServices([web]);
  const address = server.address();
  assert.ok(address, 'listening');
  return { server, port: address.port };
}

async function dig(port: number, ...args: string[]): Promise<{ out: string; status: string; flags: string[] }> {
  const { stdout } = await run('dig', ['@127.0.0.1', '-p', String(port), '+time=2', '+tries=1', ...args]);
  return { out: stdout, status: /status: (\w+)/.exec(stdout)?.[1] ?? 'none', flags: (/flags: ([^;]*);/.exec(stdout)?.[1] ?? '').trim().split(/\s+/) };
}

/** Sends one datagram; resolves the reply, or null when none comes within `waitMs`. */
function exchangeUdp(port: number, message: Buffer, waitMs = 1000): Promise<Buffer | null> {
  return new Promise((resolve) => {
    const socket = createSocket('udp4');
    const done = (reply: Buffer | null): void => {
      clearTimeout(timer);
      socket.close();
      resolve(reply);
    };
    const timer = setTimeout(() => done(null), waitMs);
    socket.on('message', (reply) => done(reply));
    socket.send(message, port, '127.0.0.1');
  });
}

async function assertStillAnswers(port: number): Promise<void> {
  const reply = await exchangeUdp(port, buildQuery('web.local', { id: 7 }));
  assert.ok(reply, 'a good query right after is answered');
  assert.deepEqual(parseResponse(reply).answers.map((a) => a.data), ['127.77.0.2']);
  assert.equal((await dig(port, 'web.local', 'A', '+short')).out.trim(), '127.77.0.2');
}

/** A DNS-over-TCP client that collects framed replies and notices when the server hangs up. */
class TcpClient {
  private buffered = Buffer.alloc(0);
  readonly replies: Buffer[] = [];
  readonly closed: Promise<void>;
  private waiting: (() => void) | undefined;

  private constructor(readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk]);
      while (this.buffered.length >= 2 && this.buffered.length >= 2 + this.buffered.readUInt16BE(0)) {
        this.replies.push(this.buffered.subarray(2, 2 + this.buffered.readUInt16BE(0)));
        this.buffered = this.buffered.subarray(2 + this.buffered.readUInt16BE(0));
      }
      this.waiting?.();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) => socket.on('close', () => resolve()));
  }

  static open(t: TestContext, port: number, localAddress?: string): Promise<TcpClient> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port, ...(localAddress ? { localAddress } : {}) }, () => resolve(new TcpClient(socket)));
      socket.once('error', reject);
      t.after(() => socket.destroy());
    });
  }

  static frame(message: Buffer): Buffer {
    return Buffer.concat([Buffer.from([message.length >> 8, message.length & 0xff]), message]);
  }

  async replyCount(count: number, timeoutMs = 2000): Promise<Buffer[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.replies.length < count && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        this.waiting = resolve;
        setTimeout(resolve, 50);
      });
    }
    assert.equal(this.replies.length, count, `${count} replies over TCP`);
    return this.replies;
  }
}

function closesWithin(client: TcpClient, ms: number): Promise<boolean> {
  return Promise.race([client.closed.then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), ms))]);
}

test('dig: A over UDP and TCP, SRV with the A in additional, case-insensitive', async (t) => {
  const { port } = await startServer(t);
  assert.equal((await dig(port, 'web.local', 'A', '+short')).out.trim(), '127.77.0.2');
  assert.equal((await dig(port, 'web.local', 'A', '+short', '+tcp')).out.trim(), '127.77.0.2');
  assert.equal((await dig(port, 'WEB.Local', 'A', '+short')).out.trim(), '127.77.0.2');
  assert.equal((await dig(port, 'web.local', 'SRV', '+short')).out.trim(), '0 1 80 web.local.');
  const srv = await dig(port, '_web._tcp.local', 'SRV', '+tcp');
  assert.match(srv.out, /ANSWER SECTION:\n_web\._tcp\.local\.\s+5\s+IN\s+SRV\s+0 1 80 web\.local\./);
  assert.match(srv.out, /ADDITIONAL SECTION:\nweb\.local\.\s+5\s+IN\s+A\s+127\.77\.0\.2/);
  assert.match(srv.out, /SERVER: 127\.0\.0\.1#\d+\(127\.0\.0\.1\) \(TCP\)/);
});

test('dig: NXDOMAIN inside the zone, REFUSED outside, NODATA for other types; never RA', async (t) => {
  const { port } = await startServer(t);
  const missing = await dig(port, 'nope.local', 'A');
  assert.equal(missing.status, 'NXDOMAIN');
  assert.ok(missing.flags.includes('aa'), `aa in ${missing.flags.join(' ')}`);
  assert.match(missing.out, /AUTHORITY SECTION:\nlocal\.\s+5\s+IN\s+SOA\s+ns\.local\. hostmaster\.local\./);
  const outside = await dig(port, 'example.com', 'A');
  assert.equal(outside.status, 'REFUSED');
  assert.ok(!outside.flags.includes('aa'));
  const nodata = await dig(port, 'web.local', 'AAAA');
  assert.equal(nodata.status, 'NOERROR');
  assert.match(nodata.out, /ANSWER: 0,/);
  const recursive = await dig(port, 'web.local', 'A');
  assert.deepEqual(recursive.flags.filter((f) => f === 'rd' || f === 'ra'), ['rd'], 'RD echoed, RA never set');
  const norec = await dig(port, 'web.local', 'A', '+norec');
  assert.deepEqual(norec.flags, ['qr', 'aa'], 'no rd, no ra');
});

test('setServices swaps the zone: the next query sees the new records', async (t) => {
  const { server, port } = await startServer(t);
  server.setServices([{ ...web, address: '127.77.0.9' }, { ...web, service: 'db', name: 'db', fqdn: 'db.local', address: '127.77.0.10' }]);
  assert.equal((await dig(port, 'web.local', 'A', '+short')).out.trim(), '127.77.0.9');
  assert.equal((await dig(port, 'db.local', 'A', '+short')).out.trim(), '127.77.0.10');
  server.setServices([]);
  assert.equal((await dig(port, 'web.local', 'A')).status, 'NXDOMAIN');
});

test('UDP: malformed packets get FORMERR with their ID or are dropped, and a good query right after is answered', async (t) => {
  const { server, port } = await startServer(t);

  const truncated = await exchangeUdp(port, buildQuery('web.local', { id: 0x1111 }).subarray(0, 19));
  assert.ok(truncated, 'a truncated question is answered');
  assert.deepEqual([parseResponse(truncated).header.id, parseResponse(truncated).header.rcode], [0x1111, 1]);
  await assertStillAnswers(port);

  const loop = await exchangeUdp(port, withHeader([0xc0, 0x0c, 0, 1, 0, 1]));
  assert.ok(loop, 'a compression loop is answered');
  assert.deepEqual([parseResponse(loop).header.id, parseResponse(loop).header.rcode], [0xbeef, 1]);
  await assertStillAnswers(port);

  const before = server.stats();
  assert.equal(await exchangeUdp(port, Buffer.from([1, 2, 3, 4, 5]), 300), null, '5 bytes: dropped');
  assert.equal(server.stats().dropped, before.dropped + 1);
  assert.equal(await exchangeUdp(port, buildQuery('web.local', { qr: true }), 300), null, 'a response: dropped');
  await assertStillAnswers(port);
});

test('UDP: 300 random packets never break the server; each one is answered with its ID or counted as dropped', async (t) => {
  const { server, port } = await startServer(t);
  const next = prng(7);
  const before = server.stats();
  const socket = createSocket('udp4');
  t.after(() => socket.close());
  const replies: Buffer[] = [];
  socket.on('message', (reply) => replies.push(reply));
  const sent = Array.from({ length: 300 }, () => randomBytes(next, Math.floor(next() * 60)));
  for (const message of sent) {
    // Paced, so the kernel's receive buffer never overflows and every packet reaches the server.
    await new Promise((resolve) => socket.send(message, port, '127.0.0.1', resolve));
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  await new Promise((resolve) => setTimeout(resolve, 300));
  const after = server.stats();
  assert.equal(after.queries - before.queries, sent.length, 'every packet was seen');
  assert.equal(replies.length, sent.length - (after.dropped - before.dropped), 'answered or dropped, nothing in between');
  const sentIds = new Set(sent.filter((m) => m.length >= 12).map((m) => m.readUInt16BE(0)));
  for (const reply of replies) {
    assert.ok(sentIds.has(reply.readUInt16BE(0)), 'the reply carries an ID that was sent');
    assert.ok((reply[2]! & 0x80) !== 0, 'QR set');
  }
  assert.ok(after.formerr + after.notimp > before.formerr + before.notimp, 'random headers mostly get FORMERR or NOTIMP');
  await assertStillAnswers(port);
});

test('TCP: several queries per connection, split across chunks and batched in one write', async (t) => {
  const { port } = await startServer(t);
  const client = await TcpClient.open(t, port);
  const framed = TcpClient.frame(buildQuery('web.local', { id: 1 }));
  for (const byte of framed) {
    client.socket.write(Buffer.from([byte]));
    await new Promise((resolve) => setImmediate(resolve));
  }
  await client.replyCount(1);
  client.socket.write(Buffer.concat([TcpClient.frame(buildQuery('web.local', { id: 2, type: 33 })), TcpClient.frame(buildQuery('nope.local', { id: 3 }))]));
  const replies = (await client.replyCount(3)).map(parseResponse);
  assert.deepEqual(replies.map((r) => [r.header.id, r.header.rcode, r.answers.length]), [[1, 0, 1], [2, 0, 1], [3, 3, 0]]);
});

test('TCP: a malformed query gets FORMERR and the connection goes on; a garbage or empty frame closes only its connection', async (t) => {
  const { port } = await startServer(t);
  const client = await TcpClient.open(t, port);
  client.socket.write(TcpClient.frame(withHeader([0xc0, 0x0c, 0, 1, 0, 1])));
  client.socket.write(TcpClient.frame(buildQuery('web.local', { id: 9 })));
  const [formerr, good] = (await client.replyCount(2)).map(parseResponse);
  assert.deepEqual([formerr?.header.id, formerr?.header.rcode], [0xbeef, 1]);
  assert.deepEqual([good?.header.id, good?.answers.map((a) => a.data)], [9, ['127.77.0.2']]);

  const bystander = await TcpClient.open(t, port);
  const garbage = await TcpClient.open(t, port);
  garbage.socket.write(Buffer.from([0, 5, 0xde, 0xad, 0xbe, 0xef, 0x00]));
  assert.equal(await closesWithin(garbage, 2000), true, 'a 5-byte frame closes the connection');
  assert.equal(garbage.replies.length, 0);
  const empty = await TcpClient.open(t, port);
  empty.socket.write(Buffer.from([0, 0]));
  assert.equal(await closesWithin(empty, 2000), true, 'an empty frame closes the connection');

  bystander.socket.write(TcpClient.frame(buildQuery('web.local', { id: 10 })));
  assert.equal(parseResponse((await bystander.replyCount(1))[0]!).header.id, 10, 'another connection is untouched');
  assert.equal((await dig(port, 'web.local', 'A', '+short', '+tcp')).out.trim(), '127.77.0.2');
});

test('TCP: replies written before a hang-up reach the client, though it keeps sending after the bad frame', async (t) => {
  const { port } = await startServer(t);
  const clients = await Promise.all(Array.from({ length: 40 }, () => TcpClient.open(t, port)));
  await Promise.all(
    clients.map(async (client, n) => {
      const good = [1, 2, 3].map((i) => TcpClient.frame(buildQuery('web.local', { id: n * 10 + i })));
      client.socket.write(Buffer.concat([...good, Buffer.from([0, 5, 1, 2, 3, 4, 5])]));
      // Still sending when the server hangs up: closing with this unread would reset the connection.
      for (let i = 0; i < 50 && !client.socket.destroyed; i++) {
        client.socket.write(Buffer.alloc(1000, 0x41));
        await new Promise((resolve) => setImmediate(resolve));
      }
      assert.equal(await closesWithin(client, 3000), true, 'the garbage frame ends the connection');
    }),
  );
  clients.forEach((client, n) => assert.deepEqual(client.replies.map((r) => parseResponse(r).header.id), [1, 2, 3].map((i) => n * 10 + i), `connection ${n}: the three replies before the garbage frame arrived`));
});

test('TCP: an idle connection is closed', async (t) => {
  const { port } = await startServer(t, { idleTimeoutMs: 200 });
  const client = await TcpClient.open(t, port);
  assert.equal(await closesWithin(client, 2000), true);
});

test('TCP: a client that trickles a byte every 300 ms is cut at the query deadline, though each byte resets the idle timeout', async (t) => {
  const { logger, lines } = captureLogger('debug');
  const { server, port } = await startServer(t, { queryDeadlineMs: 1200, idleTimeoutMs: 500, logger });
  const client = await TcpClient.open(t, port);
  const opened = Date.now();
  const framed = TcpClient.frame(buildQuery('web.local', { id: 21 }));
  let sent = 0;
  for (const byte of framed) {
    if (client.socket.destroyed || client.socket.writableEnded) break;
    client.socket.write(Buffer.from([byte]));
    sent++;
    if (await closesWithin(client, 300)) break;
  }
  await client.closed;
  const lasted = Date.now() - opened;
  assert.ok(sent >= 4 && sent < framed.length, `${sent} of ${framed.length} bytes went out before the cut`);
  assert.ok(lasted >= 1100 && lasted < 2500, `closed after ${lasted} ms; the deadline is 1200 ms`);
  assert.equal(client.replies.length, 0);
  assert.equal(server.stats().tcpDeadline, 1);
  await eventually(() => server.stats().tcpOpen === 0, 1000, 'the server to forget the connection');
  const logged = lines.filter((l) => l.code === 'LM_ERR_DNS_TCP_DEADLINE');
  assert.equal(logged.length, 1, 'logged once, with its code');
  assert.match(logged[0]!.msg, /no whole query within 1200 ms/);
  await assertStillAnswers(port);
});

test('TCP: the deadline runs per query: a pause between queries is the idle timeout, and the first query counts from accept', async (t) => {
  const { server, port } = await startServer(t, { queryDeadlineMs: 600, idleTimeoutMs: 3000 });
  const client = await TcpClient.open(t, port);
  client.socket.write(TcpClient.frame(buildQuery('web.local', { id: 31 })));
  await client.replyCount(1);
  assert.equal(await closesWithin(client, 1000), false, 'open past the deadline between queries');
  const framed = TcpClient.frame(buildQuery('web.local', { id: 32 }));
  client.socket.write(framed.subarray(0, 5));
  await new Promise((resolve) => setTimeout(resolve, 300));
  client.socket.write(framed.subarray(5));
  assert.equal(parseResponse((await client.replyCount(2))[1]!).header.id, 32, 'a query split over 300 ms, inside the deadline, is answered');
  const started = Date.now();
  client.socket.write(framed.subarray(0, 1));
  await client.closed;
  const lasted = Date.now() - started;
  assert.ok(lasted >= 500 && lasted < 1500, `a started query that stalls is cut at the deadline, not the idle timeout: ${lasted} ms`);

  const silent = await TcpClient.open(t, port);
  assert.equal(await closesWithin(silent, 1500), true, 'a connection that never sends is cut at the deadline too');
  assert.equal(server.stats().tcpDeadline, 2);
});

test('TCP: over the per-client cap a connection is closed at once, logged once; other clients and freed slots are served', async (t) => {
  const { logger, lines } = captureLogger('debug');
  const { server, port } = await startServer(t, { maxConnectionsPerClient: 3, logger });
  const held = await Promise.all([1, 2, 3].map(() => TcpClient.open(t, port)));
  const over = await Promise.all([1, 2].map(() => TcpClient.open(t, port)));
  for (const client of over) {
    client.socket.write(TcpClient.frame(buildQuery('web.local', { id: 40 })));
    assert.equal(await closesWithin(client, 1000), true, 'the 4th and 5th connection from 127.0.0.1 are closed at once');
    assert.equal(client.replies.length, 0);
  }
  for (const [i, client] of held.entries()) {
    client.socket.write(TcpClient.frame(buildQuery('web.local', { id: 41 + i })));
    assert.equal(parseResponse((await client.replyCount(1))[0]!).header.id, 41 + i, 'the three under the cap are served');
  }
  const other = await TcpClient.open(t, port, '127.0.0.2');
  other.socket.write(TcpClient.frame(buildQuery('web.local', { id: 50 })));
  assert.equal(parseResponse((await other.replyCount(1))[0]!).header.id, 50, 'another client address has its own cap');
  assert.deepEqual([server.stats().tcpLimit, server.stats().tcpOpen], [2, 4]);
  const logged = lines.filter((l) => l.code === 'LM_ERR_DNS_TCP_LIMIT');
  assert.equal(logged.length, 1, 'two refusals, one log line for the client');
  assert.match(logged[0]!.msg, /127\.0\.0\.1 closed at once: it already has 3 open \(at most 3 per client\)/);

  held[0]!.socket.destroy();
  await held[0]!.closed;
  await new Promise((resolve) => setTimeout(resolve, 100));
  const again = await TcpClient.open(t, port);
  again.socket.write(TcpClient.frame(buildQuery('web.local', { id: 51 })));
  assert.equal(parseResponse((await again.replyCount(1))[0]!).header.id, 51, 'a closed connection frees its slot');
  assert.equal(server.stats().tcpLimit, 2);
});

test('TCP: with every slot taken a new connection is closed at once and counted; UDP is unaffected', async (t) => {
  const { logger, lines } = captureLogger('debug');
  const { server, port } = await startServer(t, { maxConnections: 4, logger });
  await Promise.all(['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5'].map((address) => TcpClient.open(t, port, address)));
  await new Promise((resolve) => setTimeout(resolve, 100));
  const fifth = await TcpClient.open(t, port, '127.0.0.6');
  assert.equal(await closesWithin(fifth, 1000), true);
  assert.deepEqual([server.stats().tcpLimit, server.stats().tcpOpen], [1, 4]);
  assert.match(lines.find((l) => l.code === 'LM_ERR_DNS_TCP_LIMIT')?.msg ?? '', /127\.0\.0\.6 closed at once: all 4 DNS TCP connections are in use/);
  await assertStillAnswers(port);
});

test('FrameReader: the same messages whatever the chunking, and it knows when it is mid-message', () => {
  const next = prng(11);
  const messages = Array.from({ length: 40 }, (_, i) => randomBytes(next, i === 3 ? 0 : i === 7 ? 65535 : Math.floor(next() * 300)));
  const stream = Buffer.concat(messages.map(frame));
  const boundaries = new Set<number>();
  messages.reduce((at, m) => (boundaries.add(at + 2 + m.length), at + 2 + m.length), 0);
  for (const maxChunk of [1, 2, 3, 17, 4096, stream.length]) {
    const reader = new FrameReader();
    const read: Buffer[] = [];
    for (let at = 0; at < stream.length; ) {
      const size = Math.min(stream.length - at, 1 + Math.floor(next() * maxChunk));
      read.push(...reader.push(stream.subarray(at, at + size)));
      at += size;
      assert.equal(reader.midMessage, !boundaries.has(at), `mid-message at byte ${at} of ${stream.length}`);
    }
    assert.equal(reader.midMessage, false);
    assert.deepEqual(read.map((m) => m.toString('hex')), messages.map((m) => m.toString('hex')), `chunks of up to ${maxChunk} bytes`);
  }
  const reader = new FrameReader();
  assert.deepEqual(reader.push(Buffer.from([0])), []);
  assert.equal(reader.midMessage, true, 'one byte of a length is mid-message');
});

test('UDP: replies are the same with logging at debug (sends with a callback) and above it (without); a dropped message logs its peer as host:port', async (t) => {
  const { logger, lines } = captureLogger('debug');
  const debug = await startServer(t, { logger });
  const quiet = await startServer(t, { logger: captureLogger('info').logger });
  for (const { port } of [debug, quiet]) {
    for (let id = 1; id <= 20; id++) {
      const reply = await exchangeUdp(port, buildQuery(id % 2 === 0 ? 'web.local' : 'WEB.local', { id }));
      assert.ok(reply, `query ${id} is answered`);
      const parsed = parseResponse(reply);
      assert.equal(parsed.header.id, id);
      assert.deepEqual(parsed.answers.map((a) => a.data), ['127.77.0.2']);
    }
  }
  assert.equal(debug.server.stats().answered, 20);
  assert.equal(quiet.server.stats().answered, 20);
  assert.equal(await exchangeUdp(debug.port, buildQuery('web.local', { qr: true }), 300), null, 'a response: dropped');
  const dropped = lines.find((l) => l.msg === 'DNS message dropped: not a query');
  assert.ok(dropped, 'logged at debug');
  assert.match(String(dropped.peer), /^127\.0\.0\.1:\d+$/);
  assert.equal(dropped.transport, 'udp');
});

test('stats count every message by outcome', async (t) => {
  const { server, port } = await startServer(t);
  await dig(port, 'web.local', 'A');
  await dig(port, 'nope.local', 'A');
  await dig(port, 'example.com', 'A');
  await exchangeUdp(port, withHeader([0xc0]));
  await exchangeUdp(port, buildQuery('web.local', { opcode: 2 }));
  await exchangeUdp(port, Buffer.from([1]), 200);
  assert.deepEqual(server.stats(), { queries: 6, answered: 1, nxdomain: 1, refused: 1, formerr: 1, notimp: 1, dropped: 1, tcpOpen: 0, tcpDeadline: 0, tcpLimit: 0 });
});

test('a port in use: start() throws LM_ERR_DNS_LISTEN naming host:port; port 0 gives one port for UDP and TCP', async (t) => {
  const { port } = await startServer(t);
  const second = new DnsServer({ host: '127.0.0.1', port, logger: silentLogger(), suffix: 'local' });
  t.after(() => second.close());
  await assert.rejects(second.start(), (err: unknown) => {
    assert.ok(err instanceof DnsError);
    assert.equal(err.code, 'LM_ERR_DNS_LISTEN');
    assert.match(err.message, new RegExp(`127\\.0\\.0\\.1:${port}`));
    return true;
  });
  assert.equal(second.address(), undefined);
});
