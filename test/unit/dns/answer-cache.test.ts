import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket } from 'node:dgram';
import type { ServiceSpec } from '../../../agent/contract/balancer-config.js';
import { AnswerCache, maxCachedAnswers, readPlainQuery, replyFromCache, type PlainQuery } from '../../../agent/dns/answer-cache.js';
import { decodeQuery } from '../../../agent/dns/packet.js';
import { answerQuery, type Transport } from '../../../agent/dns/responder.js';
import { DnsServer } from '../../../agent/dns/server.js';
import { zoneFromServices } from '../../../agent/dns/zone.js';
import { silentLogger } from '../../../agent/log.js';
import { buildQuery, nameBytes, parseResponse, prng, withHeader } from './wire.js';

function spec(name: string, address: string, port: number, fqdn = `${name}.local`): ServiceSpec {
  return { service: name, name, fqdn, address, port, policy: 'round-robin', empty: 'reject', backends: [] };
}

const longName = ['a'.repeat(50), 'b'.repeat(63), 'c'.repeat(63), 'd'.repeat(50), 'local'].join('.');
const zone = zoneFromServices([spec('web', '127.77.0.2', 80), spec('redis', '127.77.0.3', 6379, 'Redis.Local'), spec('long', '127.77.0.4', 8080, longName), spec('deep', '127.77.0.5', 81, 'x.deep.local')], 'local', 5);

const plain = (message: Buffer): PlainQuery | undefined => {
  const into: PlainQuery = { questionEnd: 0, edns: false };
  return readPlainQuery(message, into) ? into : undefined;
};

test('a plain query is recognised, with and without EDNS; where its question ends', () => {
  const bare = buildQuery('web.local');
  assert.deepEqual(plain(bare), { questionEnd: bare.length, edns: false });
  const edns = buildQuery('web.local', { edns: { udpSize: 1232 } });
  assert.deepEqual(plain(edns), { questionEnd: bare.length, edns: true });
  // An OPT record with options (a cookie, say) is still plain; its bytes are not the question's.
  const withOption = Buffer.concat([edns.subarray(0, edns.length - 2), Buffer.from([0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8])]);
  assert.deepEqual(plain(withOption), { questionEnd: bare.length, edns: true });
  assert.deepEqual(plain(buildQuery('')), { questionEnd: 12 + 1 + 4, edns: false }, 'the root name');
});

test('anything but the plain shape is left to the full decoder', () => {
  const good = buildQuery('web.local', { edns: { udpSize: 1232 } });
  const patched = (at: number, value: number, from = good): Buffer => {
    const copy = Buffer.from(from);
    copy[at] = value;
    return copy;
  };
  const optAt = buildQuery('web.local').length;
  const cases: Array<[string, Buffer]> = [
    ['a response (QR set)', buildQuery('web.local', { qr: true })],
    ['opcode NOTIFY', buildQuery('web.local', { opcode: 4 })],
    ['two questions', buildQuery('web.local', { qdcount: 2 })],
    ['no question', buildQuery('web.local', { qdcount: 0 })],
    ['an answer record', patched(7, 1)],
    ['an authority record', patched(9, 1)],
    ['two additional records', patched(11, 2)],
    ['more than 255 additional records', patched(10, 1)],
    ['EDNS version 1', buildQuery('web.local', { edns: { udpSize: 1232, version: 1 } })],
    ['an OPT record not owned by the root', Buffer.concat([buildQuery('web.local'), Buffer.from([1, 0x61, 0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0])]).fill(1, 11, 12)],
    ['an additional record that is not OPT', patched(optAt + 2, 16)],
    ['an OPT record cut short', good.subarray(0, good.length - 1)],
    ['OPT data longer than the message', patched(good.length - 1, 4)],
    ['bytes after the OPT record', Buffer.concat([good, Buffer.from([0])])],
    ['bytes after the question', Buffer.concat([buildQuery('web.local'), Buffer.from([0])])],
    ['a compressed name', withHeader([0xc0, 0x0c, 0, 1, 0, 1])],
    ['an extended label type', withHeader([0x41, 0x61, 0, 0, 1, 0, 1])],
    ['a label running past the end', withHeader([9, 0x61, 0x62])],
    ['no type and class', withHeader(nameBytes('web.local'))],
    ['a name over 255 bytes', withHeader([...nameBytes(Array.from({ length: 5 }, () => 'x'.repeat(63)).join('.')), 0, 1, 0, 1])],
    ['a header only', withHeader([])],
    ['shorter than a header', Buffer.from([1, 2, 3])],
  ];
  for (const [what, message] of cases) assert.equal(plain(message), undefined, what);
});

/** Flips bytes of good queries: whatever readPlainQuery accepts, the full decoder accepts too, as the same query. */
test('fuzz: every message taken as plain decodes without error, as one question, EDNS version 0 where it says EDNS', () => {
  const next = prng(20261124);
  const seeds = [buildQuery('web.local'), buildQuery('_redis._tcp.local', { type: 33, edns: { udpSize: 4096 } }), buildQuery(longName, { edns: { udpSize: 512 } }), buildQuery('nope.local', { type: 28 })];
  let accepted = 0;
  for (let i = 0; i < 50_000; i++) {
    const message = Buffer.from(seeds[i % seeds.length]!);
    const flips = 1 + Math.floor(next() * 3);
    for (let f = 0; f < flips; f++) message[Math.floor(next() * message.length)] = next() < 0.5 ? Math.floor(next() * 256) : Math.floor(next() * 4);
    const cut = next() < 0.1 ? message.subarray(0, Math.floor(next() * message.length)) : message;
    const p = plain(cut);
    if (!p) continue;
    accepted++;
    const query = decodeQuery(cut);
    assert.equal(query.header.qr, false);
    assert.equal(query.header.opcode, 0);
    assert.equal(query.questions.length, 1);
    assert.equal(query.edns !== undefined, p.edns);
    if (query.edns) assert.equal(query.edns.version, 0);
  }
  assert.ok(accepted > 1000, `enough mutants were plain to mean something (${accepted})`);
});

/**
 * The cache's promise: for two plain queries with the same question bytes and EDNS or not, the stored
 * reply (ID, RD and CD patched) is byte for byte what the full responder gives the second one, on any
 * transport and EDNS size.
 */
test('a stored reply, patched, equals what the full responder answers, for any ID, flags, EDNS size and transport', () => {
  const next = prng(7);
  const names = ['web.local', 'WEB.local', 'wEb.LoCaL', '_web._tcp.local', '_REDIS._tcp.local', 'redis.local', 'nope.local', 'deep.local', 'x.deep.local', 'local', 'LOCAL', 'example.com', longName, `_${longName.split('.')[0]}._tcp.${longName.split('.').slice(1).join('.')}`, ''];
  const types = [1, 6, 16, 28, 33, 255, 2];
  const cache = new AnswerCache();
  let hits = 0;
  for (let i = 0; i < 20_000; i++) {
    const name = names[Math.floor(next() * names.length)]!;
    const type = types[Math.floor(next() * types.length)]!;
    const klass = next() < 0.9 ? 1 : 3;
    const edns = next() < 0.5 ? { udpSize: Math.floor(next() * 5000) } : undefined;
    const message = buildQuery(name, { id: Math.floor(next() * 65536), type, class: klass, rd: next() < 0.5, edns });
    // Random bits the reply must not depend on (AA, TC, RA, Z, AD) or must copy (CD); EDNS DO and flags.
    message[2]! |= next() < 0.3 ? 0x06 : 0;
    message[3]! |= Math.floor(next() * 256) & 0xf0;
    if (edns) {
      message[message.length - 6] = Math.floor(next() * 256); // extended RCODE
      message[message.length - 4] = Math.floor(next() * 256); // DO and the other EDNS flags
    }
    const transport: Transport = next() < 0.8 ? 'udp' : 'tcp';
    const p = plain(message);
    assert.ok(p, `plain: ${name}`);
    const key = AnswerCache.key(message, p.questionEnd);
    const full = answerQuery(message, zone, transport);
    assert.ok(full.response, 'answered');
    const hit = cache.get(key, p.edns);
    if (hit) {
      hits++;
      assert.equal(hit.outcome, full.outcome, `outcome for ${name} type ${type}`);
      assert.deepEqual(replyFromCache(hit, message), full.response, `bytes for ${name} type ${type} class ${klass} edns ${JSON.stringify(edns)} ${transport}`);
    } else {
      if (full.whole === true) cache.set(key, p.edns, full.response, full.outcome);
    }
  }
  assert.ok(hits > 15_000, `most were hits (${hits})`);
});

test('a reply over 512 bytes is not stored; the cache starts over when full', () => {
  const cache = new AnswerCache();
  cache.set('big', false, Buffer.alloc(513), 'answered');
  assert.equal(cache.get('big', false), undefined);
  cache.set('small', true, Buffer.alloc(40), 'answered');
  assert.equal(cache.get('small', false), undefined, 'EDNS and plain are apart');
  assert.ok(cache.get('small', true));
  for (let i = 0; i < maxCachedAnswers; i++) cache.set(`k${i}`, false, Buffer.alloc(20), 'nxdomain');
  assert.ok(cache.entries <= maxCachedAnswers);
  assert.equal(cache.get('small', true), undefined, 'started over');
});

function exchange(port: number, message: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const socket = createSocket('udp4');
    const timer = setTimeout(() => {
      socket.close();
      reject(new Error('no reply within 2 s'));
    }, 2000);
    socket.on('message', (reply) => {
      clearTimeout(timer);
      socket.close();
      resolve(reply);
    });
    socket.send(message, port, '127.0.0.1');
  });
}

test('the server answers repeated queries from the cache with their own ID, counts them, and forgets answers when the zone changes', async (t) => {
  const server = new DnsServer({ host: '127.0.0.1', port: 0, logger: silentLogger(), suffix: 'local' });
  t.after(() => server.close());
  await server.start();
  server.setServices([spec('web', '127.77.0.2', 80)]);
  const port = server.address()!.port;
  for (let id = 1; id <= 3; id++) {
    const reply = parseResponse(await exchange(port, buildQuery('web.local', { id, rd: id !== 2 })));
    assert.equal(reply.header.id, id);
    assert.equal(reply.header.rd, id !== 2, 'RD copied from the query');
    assert.deepEqual(reply.answers.map((a) => a.data), ['127.77.0.2']);
  }
  const missing = parseResponse(await exchange(port, buildQuery('gone.local', { id: 9 })));
  assert.equal(missing.header.rcode, 3);
  assert.equal(parseResponse(await exchange(port, buildQuery('gone.local', { id: 10 }))).header.rcode, 3);
  assert.deepEqual([server.stats().queries, server.stats().answered, server.stats().nxdomain], [5, 3, 2]);

  server.setServices([spec('web', '127.77.0.9', 80), spec('gone', '127.77.0.8', 80)]);
  assert.deepEqual(parseResponse(await exchange(port, buildQuery('web.local', { id: 4 }))).answers.map((a) => a.data), ['127.77.0.9'], 'the new address, not the stored one');
  assert.deepEqual(parseResponse(await exchange(port, buildQuery('gone.local', { id: 11 }))).answers.map((a) => a.data), ['127.77.0.8'], 'a name that was missing now answers');
});
