import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { ServiceSpec } from '../../../agent/contract/balancer-config.js';
import { answerQuery, respond, type Outcome } from '../../../agent/dns/responder.js';
import { findName, zoneFromServices } from '../../../agent/dns/zone.js';
import { buildQuery, nameBytes, parseResponse, withHeader, type ParsedRecord, type QueryOptions } from './wire.js';

function spec(name: string, address: string, port: number, fqdn = `${name}.local`): ServiceSpec {
  return { service: name, name, fqdn, address, port, policy: 'round-robin', empty: 'reject', backends: [] };
}

const longName = ['a'.repeat(50), 'b'.repeat(63), 'c'.repeat(63), 'd'.repeat(50), 'local'].join('.');
const zone = zoneFromServices([spec('web', '127.77.0.2', 80), spec('redis', '127.77.0.3', 6379, 'Redis.Local'), spec('long', '127.77.0.4', 8080, longName)], 'local', 5);
const soa = 'ns.local hostmaster.local 1 3600 600 86400 5';
const A = 1, SOA = 6, TXT = 16, AAAA = 28, SRV = 33, ANY = 255;

const rr = (name: string, type: number, data: string, ttl = 5): ParsedRecord => ({ name, type, class: 1, ttl, data });

interface Case {
  what: string;
  query: Buffer;
  outcome: Outcome;
  rcode?: number;
  aa?: boolean;
  answers?: ParsedRecord[];
  authority?: ParsedRecord[];
  additional?: ParsedRecord[];
  tc?: boolean;
  opcode?: number;
}

const q = (name: string, options: QueryOptions = {}): Buffer => buildQuery(name, options);

const cases: Case[] = [
  { what: 'A for NAME.SUFFIX', query: q('web.local'), outcome: 'answered', rcode: 0, aa: true, answers: [rr('web.local', A, '127.77.0.2')] },
  { what: 'names are case-insensitive; the answer keeps the asked case', query: q('WeB.LOCAL'), outcome: 'answered', rcode: 0, answers: [rr('WeB.LOCAL', A, '127.77.0.2')] },
  { what: 'an fqdn given in upper case is published in lower case', query: q('redis.local'), outcome: 'answered', answers: [rr('redis.local', A, '127.77.0.3')] },
  { what: 'SRV for NAME.SUFFIX, with the A record in additional', query: q('web.local', { type: SRV }), outcome: 'answered', aa: true, answers: [rr('web.local', SRV, '0 1 80 web.local')], additional: [rr('web.local', A, '127.77.0.2')] },
  { what: 'SRV for _NAME._tcp.SUFFIX', query: q('_redis._tcp.local', { type: SRV }), outcome: 'answered', answers: [rr('_redis._tcp.local', SRV, '0 1 6379 redis.local')], additional: [rr('redis.local', A, '127.77.0.3')] },
  { what: 'ANY gives A and SRV', query: q('web.local', { type: ANY }), outcome: 'answered', answers: [rr('web.local', A, '127.77.0.2'), rr('web.local', SRV, '0 1 80 web.local')] },
  { what: 'AAAA for a known name: NODATA, SOA in authority', query: q('web.local', { type: AAAA }), outcome: 'answered', rcode: 0, aa: true, answers: [], authority: [rr('local', SOA, soa)] },
  { what: 'TXT for a known name: NODATA', query: q('web.local', { type: TXT }), outcome: 'answered', rcode: 0, answers: [], authority: [rr('local', SOA, soa)] },
  { what: 'A for the SRV owner: NODATA', query: q('_web._tcp.local'), outcome: 'answered', rcode: 0, answers: [] },
  { what: 'the apex: NODATA', query: q('local'), outcome: 'answered', rcode: 0, aa: true, answers: [], authority: [rr('local', SOA, soa)] },
  { what: 'SOA at the apex', query: q('LOCAL', { type: SOA }), outcome: 'answered', rcode: 0, answers: [rr('LOCAL', SOA, soa)] },
  { what: 'an empty non-terminal (_tcp.local): NODATA, not NXDOMAIN', query: q('_tcp.local'), outcome: 'answered', rcode: 0, answers: [] },
  { what: 'an unknown name in the zone: NXDOMAIN with SOA', query: q('nope.local'), outcome: 'nxdomain', rcode: 3, aa: true, answers: [], authority: [rr('local', SOA, soa)] },
  { what: 'a name below a service: NXDOMAIN', query: q('x.web.local'), outcome: 'nxdomain', rcode: 3 },
  { what: '_NAME._udp: NXDOMAIN', query: q('_web._udp.local', { type: SRV }), outcome: 'nxdomain', rcode: 3 },
  { what: 'a name outside the zone: REFUSED, not authoritative', query: q('example.com'), outcome: 'refused', rcode: 5, aa: false, answers: [] },
  { what: 'a name that only ends like the suffix: REFUSED', query: q('weblocal'), outcome: 'refused', rcode: 5 },
  { what: 'the suffix as a middle label: REFUSED', query: q('web.local.example'), outcome: 'refused', rcode: 5 },
  { what: 'the root: REFUSED', query: q(''), outcome: 'refused', rcode: 5 },
  { what: 'one label holding a dot ("web\\.local"): REFUSED', query: withHeader([9, ...Buffer.from('web.local'), 0, 0, 1, 0, 1]), outcome: 'refused', rcode: 5 },
  { what: 'an escaped dot one level down ("a\\.b.local"): NXDOMAIN', query: withHeader([3, ...Buffer.from('a.b'), 5, ...Buffer.from('local'), 0, 0, 1, 0, 1]), outcome: 'nxdomain', rcode: 3 },
  { what: 'class CH: REFUSED', query: q('web.local', { class: 3 }), outcome: 'refused', rcode: 5 },
  { what: 'opcode NOTIFY: NOTIMP, opcode echoed', query: q('web.local', { opcode: 4 }), outcome: 'notimp', rcode: 4, opcode: 4, aa: false },
  { what: 'opcode UPDATE with no question: NOTIMP', query: q('web.local', { opcode: 5, qdcount: 0 }).subarray(0, 12), outcome: 'notimp', rcode: 4, opcode: 5 },
  { what: 'no question: FORMERR', query: q('web.local', { qdcount: 0 }).subarray(0, 12), outcome: 'formerr', rcode: 1 },
  { what: 'two questions: FORMERR', query: withHeader([...nameBytes('web.local'), 0, 1, 0, 1, ...nameBytes('web.local'), 0, 1, 0, 1], [2, 0, 0, 0]), outcome: 'formerr', rcode: 1 },
  { what: 'a truncated question: FORMERR', query: q('web.local').subarray(0, 18), outcome: 'formerr', rcode: 1, aa: false },
  { what: 'a compression loop: FORMERR', query: withHeader([0xc0, 0x0c, 0, 1, 0, 1]), outcome: 'formerr', rcode: 1 },
  { what: 'EDNS version 1: BADVERS (16) in the OPT record', query: q('web.local', { edns: { udpSize: 1232, version: 1 } }), outcome: 'formerr', rcode: 0, answers: [], additional: [rr('', 41, '', 0x01000000)] },
  { what: 'EDNS: the response carries an OPT record', query: q('web.local', { edns: { udpSize: 4096 } }), outcome: 'answered', answers: [rr('web.local', A, '127.77.0.2')], additional: [rr('', 41, '', 0)] },
  { what: 'over 512 bytes without EDNS: TC, no answers', query: q(longName, { type: ANY }), outcome: 'answered', tc: true, answers: [] },
  { what: 'the same with an EDNS size of 1232: it fits', query: q(longName, { type: ANY, edns: { udpSize: 1232 } }), outcome: 'answered', tc: false, answers: [rr(longName, A, '127.77.0.4'), rr(longName, SRV, `0 1 8080 ${longName}`)] },
  { what: 'an EDNS size under 512 still allows 512', query: q('web.local', { edns: { udpSize: 100 } }), outcome: 'answered', tc: false, answers: [rr('web.local', A, '127.77.0.2')] },
];

for (const c of cases) {
  test(`respond: ${c.what}`, () => {
    const reply = answerQuery(c.query, zone);
    assert.equal(reply.outcome, c.outcome);
    assert.ok(reply.response, 'a response');
    const r = parseResponse(reply.response);
    const asked = c.query.readUInt16BE(0);
    assert.equal(r.header.id, asked, 'the ID is echoed');
    assert.equal(r.header.qr, true);
    assert.equal(r.header.ra, false, 'never recursion available');
    assert.equal(r.header.rd, (c.query[2]! & 1) === 1, 'RD is echoed');
    if (c.rcode !== undefined) assert.equal(r.header.rcode, c.rcode);
    if (c.aa !== undefined) assert.equal(r.header.aa, c.aa);
    if (c.tc !== undefined) assert.equal(r.header.tc, c.tc);
    assert.equal(r.header.opcode, c.opcode ?? 0);
    if (c.answers) assert.deepEqual(r.answers.map((x) => (x.type === 41 ? { ...x, data: '' } : x)), c.answers);
    if (c.authority) assert.deepEqual(r.authority, c.authority);
    if (c.additional) assert.deepEqual(r.additional.map((x) => (x.type === 41 ? { ...x, class: 1, data: '' } : x)), c.additional);
    if (c.rcode !== 1 && c.outcome !== 'notimp') assert.equal(r.questions.length, 1, 'the question is echoed');
  });
}

test('respond: RD clear stays clear', () => {
  const r = parseResponse(respond(q('web.local', { rd: false }), zone)!);
  assert.deepEqual([r.header.rd, r.header.ra, r.header.aa], [false, false, true]);
});

test('respond: TCP has no 512-byte limit', () => {
  const r = parseResponse(respond(q(longName, { type: ANY }), zone, 'tcp')!);
  assert.equal(r.header.tc, false);
  assert.equal(r.answers.length, 2);
});

const dropped: Array<{ what: string; query: Buffer }> = [
  { what: 'a response (QR=1)', query: q('web.local', { qr: true }) },
  { what: '11 bytes', query: q('web.local').subarray(0, 11) },
  { what: 'nothing', query: Buffer.alloc(0) },
];
for (const c of dropped) {
  test(`respond: ${c.what} is dropped`, () => {
    assert.equal(respond(c.query, zone), null);
    assert.equal(answerQuery(c.query, zone).outcome, 'dropped');
  });
}

test('respond: a malformed query carries the DnsError that explains it', () => {
  const reply = answerQuery(withHeader([0xc0, 0x0c, 0, 1, 0, 1]), zone);
  assert.equal(reply.error?.code, 'LM_ERR_DNS_MALFORMED');
  assert.match(reply.error?.message ?? '', /loop.* at offset 12/);
});

test('zoneFromServices leaves out names it cannot serve; the first of a duplicate wins', () => {
  const z = zoneFromServices(
    [
      spec('web', '127.77.0.2', 80),
      spec('dup', '127.77.0.9', 81, 'web.local'),
      spec('outside', '127.77.0.5', 82, 'db.example'),
      spec('apex', '127.77.0.6', 83, 'local'),
      spec('v6', '::1', 84),
      spec('toolong', '127.77.0.7', 85, `${'x'.repeat(64)}.local`),
    ],
    '.LOCAL.',
    5.7,
  );
  assert.equal(z.suffix, 'local');
  assert.equal(z.ttl, 5);
  assert.deepEqual([...z.records], [['web.local', { address: '127.77.0.2', port: 80, service: 'web' }]]);
  assert.deepEqual(findName(z, 'Web.Local.'), { kind: 'host', fqdn: 'web.local', record: { address: '127.77.0.2', port: 80, service: 'web' } });
});

test('a new zone object answers from the new records (the server swaps by assignment)', () => {
  const before = zoneFromServices([spec('web', '127.77.0.2', 80)], 'local', 5);
  const after = zoneFromServices([spec('web', '127.77.0.9', 80)], 'local', 30);
  assert.deepEqual(parseResponse(respond(q('web.local'), before)!).answers, [rr('web.local', A, '127.77.0.2')]);
  assert.deepEqual(parseResponse(respond(q('web.local'), after)!).answers, [rr('web.local', A, '127.77.0.9', 30)]);
  assert.equal(parseResponse(respond(q('_tcp.local'), zoneFromServices([], 'local', 5))!).header.rcode, 3, 'no services, no empty non-terminals');
});
