import { test } from 'node:test';
import assert from 'node:assert/strict';
import { nameToLabels, readName } from '../../../agent/dns/domain-name.js';
import { decodeQuery, encodeResponse, type DnsResponse } from '../../../agent/dns/packet.js';
import { DnsError } from '../../../agent/errors.js';
import { buildQuery, nameBytes, parseResponse, prng, randomBytes, withHeader } from './wire.js';

test('a query decodes: ID, flags, the question with its case, EDNS from the additional section', () => {
  const query = decodeQuery(buildQuery('WeB.Local', { id: 0xabcd, type: 33, rd: false, edns: { udpSize: 4096 } }));
  assert.equal(query.header.id, 0xabcd);
  assert.equal(query.header.qr, false);
  assert.equal(query.header.rd, false);
  assert.equal(query.header.opcode, 0);
  assert.deepEqual(query.questions, [{ name: 'WeB.Local', type: 33, class: 1 }]);
  assert.deepEqual(query.edns, { udpSize: 4096, version: 0, dnssecOk: false });
  assert.equal(decodeQuery(buildQuery('web.local')).edns, undefined);
});

test('compressed names decode; labels keep every byte, escaped in presentation form and back', () => {
  const buf = Buffer.from([...nameBytes('web.local'), 3, ...Buffer.from('www'), 0xc0, 0x00, 0xc0, 0x0b]);
  assert.deepEqual(readName(buf, 0), { name: 'web.local', end: 11 });
  assert.deepEqual(readName(buf, 11), { name: 'www.web.local', end: 17 });
  assert.deepEqual(readName(buf, 17), { name: 'www.web.local', end: 19 }, 'a pointer to a name that itself ends in a pointer');
  const odd = Buffer.from([3, 0x61, 0x2e, 0x00, 2, 0x5c, 0xff, 0]);
  assert.equal(readName(odd, 0).name, 'a\\.\\000.\\\\\\255');
  assert.deepEqual(Buffer.concat(nameToLabels(readName(odd, 0).name)), Buffer.from([0x61, 0x2e, 0x00, 0x5c, 0xff]));
  assert.throws(() => nameToLabels(`${'a'.repeat(64)}.local`), RangeError);
});

const malformedCases: Array<{ what: string; message: Buffer; expect: RegExp }> = [
  { what: 'a pointer to itself', message: withHeader([0xc0, 0x0c, 0, 1, 0, 1]), expect: /compression pointer to offset 12 .*loop.* at offset 12/ },
  { what: 'a loop through a label', message: withHeader([1, 0x61, 0xc0, 0x0c, 0, 1, 0, 1]), expect: /does not point backwards.* at offset 14/ },
  { what: 'a forward pointer', message: withHeader([0xc0, 0x20, 0, 1, 0, 1]), expect: /pointer to offset 32.* at offset 12/ },
  { what: 'a pointer cut off', message: withHeader([0xc0]), expect: /pointer cut off.* at offset 12/ },
  { what: 'a label running off the end', message: withHeader([5, 0x61, 0x62]), expect: /label of 5 bytes runs past the end.* at offset 12/ },
  { what: 'a name with no end', message: withHeader([1, 0x61]), expect: /name runs past the end.* at offset 14/ },
  { what: 'a label length over 63', message: withHeader([0x40, ...Buffer.alloc(64, 0x61), 0, 0, 1, 0, 1]), expect: /label length byte 0x40.* at offset 12/ },
  { what: 'a name over 255 bytes', message: withHeader([...nameBytes(Array(5).fill('a'.repeat(63)).join('.')), 0, 1, 0, 1]), expect: /name longer than 255 bytes at offset 204/ },
  { what: 'a question without type and class', message: withHeader([...nameBytes('web.local'), 0, 1]), expect: /question type and class needs 4 bytes, 2 left at offset 23/ },
  { what: 'bytes after the question', message: withHeader([...nameBytes('web.local'), 0, 1, 0, 1, 9, 9]), expect: /2 bytes after the last record at offset 27/ },
  { what: 'a second question missing', message: withHeader([...nameBytes('a'), 0, 1, 0, 1], [2, 0, 0, 0]), expect: /name runs past the end.* at offset 19/ },
  { what: 'record data past the end', message: withHeader([...nameBytes('a'), 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 9, 1], [1, 1, 0, 0]), expect: /record data needs 9 bytes, 1 left at offset 30/ },
  {
    what: 'two OPT records',
    message: withHeader([...nameBytes('a'), 0, 1, 0, 1, ...[0, 0, 41, 16, 0, 0, 0, 0, 0, 0, 0], ...[0, 0, 41, 16, 0, 0, 0, 0, 0, 0, 0]], [1, 0, 0, 2]),
    expect: /a second OPT record at offset 30/,
  },
  { what: 'an OPT record not owned by the root', message: withHeader([...nameBytes('a'), 0, 1, 0, 1, ...nameBytes('x'), 0, 41, 16, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 1]), expect: /OPT record owned by "x".* at offset 19/ },
  { what: 'a short header', message: Buffer.from([1, 2, 3, 4, 5]), expect: /5 bytes, shorter than the 12-byte header at offset 0/ },
];

for (const c of malformedCases) {
  test(`malformed: ${c.what} -> DnsError LM_ERR_DNS_MALFORMED saying what and where`, () => {
    assert.throws(
      () => decodeQuery(c.message),
      (err: unknown) => {
        assert.ok(err instanceof DnsError, `expected a DnsError, got ${String(err)}`);
        assert.equal(err.code, 'LM_ERR_DNS_MALFORMED');
        assert.match(err.message, c.expect);
        return true;
      },
    );
  });
}

test('fuzz: random bytes and mutated queries either decode or throw a DnsError, nothing else', () => {
  const next = prng(20240611);
  const good = buildQuery('web.local', { edns: { udpSize: 1232 } });
  let decoded = 0;
  for (let i = 0; i < 5000; i++) {
    const message = i % 2 === 0 ? randomBytes(next, Math.floor(next() * 80)) : Buffer.from(good);
    if (i % 2 === 1) for (let k = 0; k < 3; k++) message[Math.floor(next() * message.length)] = Math.floor(next() * 256);
    try {
      decodeQuery(message);
      decoded++;
    } catch (err) {
      assert.ok(err instanceof DnsError, `message ${message.toString('hex')} threw ${String(err)}`);
    }
  }
  assert.ok(decoded > 0 && decoded < 5000, `some mutated queries still decode (${decoded})`);
});

const response: DnsResponse = {
  id: 0x4242,
  opcode: 0,
  aa: true,
  rd: true,
  cd: false,
  rcode: 0,
  questions: [{ name: 'Web.local', type: 33, class: 1 }],
  answers: [{ name: 'Web.local', ttl: 5, type: 'SRV', priority: 0, weight: 1, port: 6379, target: 'web.local' }],
  authority: [{ name: 'local', ttl: 5, type: 'SOA', mname: 'ns.local', rname: 'hostmaster.local', serial: 1, refresh: 3600, retry: 600, expire: 86400, minimum: 5 }],
  additional: [{ name: 'web.local', ttl: 5, type: 'A', address: '127.77.0.2' }],
};

test('responses encode A, SRV and SOA; names compress, the SRV target does not (RFC 2782)', () => {
  const bytes = encodeResponse(response);
  const parsed = parseResponse(bytes);
  assert.equal(parsed.header.id, 0x4242);
  assert.deepEqual([parsed.header.qr, parsed.header.aa, parsed.header.rd, parsed.header.ra, parsed.header.tc], [true, true, true, false, false]);
  assert.deepEqual(parsed.questions, [{ name: 'Web.local', type: 33, class: 1 }]);
  assert.deepEqual(parsed.answers, [{ name: 'Web.local', type: 33, class: 1, ttl: 5, data: '0 1 6379 web.local' }]);
  assert.deepEqual(parsed.authority, [{ name: 'local', type: 6, class: 1, ttl: 5, data: 'ns.local hostmaster.local 1 3600 600 86400 5' }]);
  assert.deepEqual(parsed.additional, [{ name: 'web.local', type: 1, class: 1, ttl: 5, data: '127.77.0.2' }]);
  const answerOwner = 12 + nameBytes('Web.local').length + 4;
  assert.deepEqual([...bytes.subarray(answerOwner, answerOwner + 2)], [0xc0, 0x0c], 'the answer owner points at the question');
  const target = answerOwner + 2 + 10 + 6;
  assert.deepEqual([...bytes.subarray(target, target + 11)], nameBytes('web.local'), 'the SRV target is written out in full');
});

test('an EDNS response carries an OPT record; an rcode over 15 puts its upper bits there', () => {
  const bytes = encodeResponse({ ...response, answers: [], authority: [], additional: [], rcode: 16, edns: { udpSize: 1232 } });
  const parsed = parseResponse(bytes);
  assert.equal(parsed.header.rcode, 0);
  assert.equal(parsed.additional.length, 1);
  assert.deepEqual({ ...parsed.additional[0], data: undefined }, { name: '', type: 41, class: 1232, ttl: 0x01000000, data: undefined });
});

test('too big: the additional section goes first without TC; then only the question, with TC', () => {
  const full = encodeResponse(response).length;
  const noAdditional = parseResponse(encodeResponse(response, full - 1));
  assert.equal(noAdditional.header.tc, false);
  assert.equal(noAdditional.additional.length, 0);
  assert.equal(noAdditional.answers.length, 1);
  const truncated = parseResponse(encodeResponse(response, 40));
  assert.equal(truncated.header.tc, true);
  assert.deepEqual([truncated.answers.length, truncated.authority.length, truncated.additional.length], [0, 0, 0]);
  assert.deepEqual(truncated.questions, response.questions);
});

test('a response that grows past 512 bytes at any point encodes whole (the writer grows before it writes)', () => {
  // Question names and SRV targets (never compressed) of every length in a range: one of these puts
  // each 2- and 4-byte field of the SRV, the A record and the OPT record right across the first 512 bytes.
  let over512 = 0;
  for (let k = 1; k <= 63; k++) {
    const question = `_x._tcp.${'q'.repeat(63)}.${'r'.repeat(63)}.${'t'.repeat(30)}.${'s'.repeat(k)}.local`;
    for (const extra of [40, 50, 60]) {
      const target = [`a${'x'.repeat(extra)}`, 'b'.repeat(63), 'c'.repeat(63), 'd'.repeat(40), 'local'].join('.');
      const response: DnsResponse = {
        id: 1, opcode: 0, aa: true, rd: true, cd: false, rcode: 0,
        questions: [{ name: question, type: 33, class: 1 }],
        answers: [{ name: question, ttl: 5, type: 'SRV', priority: 0, weight: 1, port: 80, target }],
        authority: [],
        additional: [{ name: target, ttl: 5, type: 'A', address: '127.0.0.2' }],
        edns: { udpSize: 1232 },
      };
      const bytes = encodeResponse(response);
      if (bytes.length > 512) over512++;
      const parsed = parseResponse(bytes);
      assert.equal(parsed.answers[0]?.data, `0 1 80 ${target}`);
      assert.equal(parsed.additional[0]?.data, '127.0.0.2');
    }
  }
  assert.ok(over512 > 30, `many cross 512 bytes (${over512})`);
});
