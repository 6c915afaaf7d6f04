import { readName } from '../../../agent/dns/domain-name.js';
import { decodeHeader, headerSize, type DnsHeader } from '../../../agent/dns/packet.js';

/** Test-side DNS message building and reading, written from RFC 1035 independently of the encoder. */
export function nameBytes(name: string): number[] {
  const out: number[] = [];
  for (const label of name.split('.').filter((l) => l !== '')) out.push(label.length, ...Buffer.from(label, 'latin1'));
  out.push(0);
  return out;
}

export interface QueryOptions {
  id?: number;
  type?: number;
  class?: number;
  rd?: boolean;
  qr?: boolean;
  opcode?: number;
  qdcount?: number;
  /** EDNS OPT record: UDP size and version. */
  edns?: { udpSize: number; version?: number };
}

export function buildQuery(name: string, options: QueryOptions = {}): Buffer {
  const { id = 0x1234, type = 1, rd = true, qr = false, opcode = 0, edns } = options;
  const flags = (qr ? 0x8000 : 0) | (opcode << 11) | (rd ? 0x0100 : 0);
  const header = [id >> 8, id & 0xff, flags >> 8, flags & 0xff, 0, options.qdcount ?? 1, 0, 0, 0, 0, 0, edns ? 1 : 0];
  const question = [...nameBytes(name), type >> 8, type & 0xff, 0, options.class ?? 1];
  const opt = edns ? [0, 0, 41, edns.udpSize >> 8, edns.udpSize & 0xff, 0, edns.version ?? 0, 0, 0, 0, 0] : [];
  return Buffer.from([...header, ...question, ...opt]);
}

/** A header (ID 0xbeef, RD, one question) followed by raw bytes. */
export function withHeader(body: number[], counts: [number, number, number, number] = [1, 0, 0, 0]): Buffer {
  return Buffer.from([0xbe, 0xef, 0x01, 0x00, ...counts.flatMap((c) => [c >> 8, c & 0xff]), ...body]);
}

export interface ParsedRecord {
  name: string;
  type: number;
  class: number;
  ttl: number;
  /** A: the address; SRV: "priority weight port target"; SOA: "mname rname serial refresh retry expire minimum". */
  data: string;
}

export interface ParsedResponse {
  header: DnsHeader;
  questions: Array<{ name: string; type: number; class: number }>;
  answers: ParsedRecord[];
  authority: ParsedRecord[];
  additional: ParsedRecord[];
}

function readRecord(buf: Buffer, offset: number): { record: ParsedRecord; end: number } {
  const { name, end } = readName(buf, offset);
  const type = buf.readUInt16BE(end);
  const length = buf.readUInt16BE(end + 8);
  const start = end + 10;
  let data = buf.subarray(start, start + length).toString('hex');
  if (type === 1) data = [...buf.subarray(start, start + 4)].join('.');
  if (type === 33) data = `${buf.readUInt16BE(start)} ${buf.readUInt16BE(start + 2)} ${buf.readUInt16BE(start + 4)} ${readName(buf, start + 6).name}`;
  if (type === 6) {
    const mname = readName(buf, start);
    const rname = readName(buf, mname.end);
    const numbers = [0, 4, 8, 12, 16].map((i) => buf.readUInt32BE(rname.end + i));
    data = [mname.name, rname.name, ...numbers].join(' ');
  }
  return { record: { name, type, class: buf.readUInt16BE(end + 2), ttl: buf.readUInt32BE(end + 4), data }, end: start + length };
}

export function parseResponse(buf: Buffer): ParsedResponse {
  const header = decodeHeader(buf);
  let offset = headerSize;
  const questions = [];
  for (let i = 0; i < header.qdcount; i++) {
    const { name, end } = readName(buf, offset);
    questions.push({ name, type: buf.readUInt16BE(end), class: buf.readUInt16BE(end + 2) });
    offset = end + 4;
  }
  const section = (count: number): ParsedRecord[] =>
    Array.from({ length: count }, () => {
      const { record, end } = readRecord(buf, offset);
      offset = end;
      return record;
    });
  const answers = section(header.ancount);
  const authority = section(header.nscount);
  const additional = section(header.arcount);
  if (offset !== buf.length) throw new Error(`${buf.length - offset} bytes after the last record`);
  return { header, questions, answers, authority, additional };
}

/** A small deterministic PRNG (mulberry32), so a fuzz failure can be replayed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomBytes(next: () => number, length: number): Buffer {
  return Buffer.from(Array.from({ length }, () => Math.floor(next() * 256)));
}
