import { malformed, readName } from './domain-name.js';
import { MessageWriter } from './message-writer.js';

/** The DNS message format (RFC 1035 4.1), the part a zone-only responder needs, plus EDNS (RFC 6891). */
export const headerSize = 12;

export const recordTypes = { A: 1, NS: 2, CNAME: 5, SOA: 6, PTR: 12, MX: 15, TXT: 16, AAAA: 28, SRV: 33, OPT: 41, ANY: 255 } as const;
export const recordClasses = { IN: 1, CH: 3, HS: 4, ANY: 255 } as const;
export const opcodes = { QUERY: 0, IQUERY: 1, STATUS: 2, NOTIFY: 4, UPDATE: 5 } as const;
export const rcodes = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5, BADVERS: 16 } as const;

/** The largest UDP payload we accept and advertise (the DNS flag day 2020 value: no IP fragmentation). */
export const ednsUdpSize = 1232;
export const classicUdpSize = 512;

export interface DnsHeader {
  id: number;
  qr: boolean;
  opcode: number;
  aa: boolean;
  tc: boolean;
  rd: boolean;
  ra: boolean;
  ad: boolean;
  cd: boolean;
  rcode: number;
  qdcount: number;
  ancount: number;
  nscount: number;
  arcount: number;
}

export interface DnsQuestion {
  /** Presentation form, case as sent, no trailing dot. */
  name: string;
  type: number;
  class: number;
}

export interface Edns {
  udpSize: number;
  version: number;
  dnssecOk: boolean;
}

export interface DnsQuery {
  header: DnsHeader;
  questions: DnsQuestion[];
  edns: Edns | undefined;
}

export type DnsRecordData =
  | { type: 'A'; address: string }
  | { type: 'SRV'; priority: number; weight: number; port: number; target: string }
  | { type: 'SOA'; mname: string; rname: string; serial: number; refresh: number; retry: number; expire: number; minimum: number };

export type DnsRecord = { name: string; ttl: number } & DnsRecordData;

export interface DnsResponse {
  id: number;
  opcode: number;
  aa: boolean;
  rd: boolean;
  cd: boolean;
  /** Up to 4095; values over 15 need `edns` (the upper bits travel in the OPT record). */
  rcode: number;
  questions: DnsQuestion[];
  answers: DnsRecord[];
  authority: DnsRecord[];
  additional: DnsRecord[];
  /** Present when the query carried EDNS: the response then carries an OPT record too. */
  edns?: { udpSize: number } | undefined;
}

export function decodeHeader(message: Buffer): DnsHeader {
  if (message.length < headerSize) throw malformed(`${message.length} bytes, shorter than the ${headerSize}-byte header`, 0);
  const flags = message.readUInt16BE(2);
  return {
    id: message.readUInt16BE(0),
    qr: (flags & 0x8000) !== 0,
    opcode: (flags >> 11) & 0xf,
    aa: (flags & 0x0400) !== 0,
    tc: (flags & 0x0200) !== 0,
    rd: (flags & 0x0100) !== 0,
    ra: (flags & 0x0080) !== 0,
    ad: (flags & 0x0020) !== 0,
    cd: (flags & 0x0010) !== 0,
    rcode: flags & 0xf,
    qdcount: message.readUInt16BE(4),
    ancount: message.readUInt16BE(6),
    nscount: message.readUInt16BE(8),
    arcount: message.readUInt16BE(10),
  };
}

function need(message: Buffer, offset: number, bytes: number, what: string): void {
  if (offset + bytes > message.length) throw malformed(`${what} needs ${bytes} bytes, ${Math.max(0, message.length - offset)} left`, offset);
}

function readQuestion(message: Buffer, offset: number): { question: DnsQuestion; end: number } {
  const { name, end } = readName(message, offset);
  need(message, end, 4, 'question type and class');
  return { question: { name, type: message.readUInt16BE(end), class: message.readUInt16BE(end + 2) }, end: end + 4 };
}

interface RawRecord {
  name: string;
  type: number;
  class: number;
  ttl: number;
  start: number;
  end: number;
}

function readRecord(message: Buffer, offset: number): RawRecord {
  const { name, end } = readName(message, offset);
  need(message, end, 10, 'record type, class, TTL and length');
  const length = message.readUInt16BE(end + 8);
  need(message, end + 10, length, 'record data');
  return { name, type: message.readUInt16BE(end), class: message.readUInt16BE(end + 2), ttl: message.readUInt32BE(end + 4), start: offset, end: end + 10 + length };
}

/** Decodes a whole query; throws a DnsError (LM_ERR_DNS_MALFORMED) naming what is wrong and where. */
export function decodeQuery(message: Buffer): DnsQuery {
  const header = decodeHeader(message);
  let offset = headerSize;
  const questions: DnsQuestion[] = [];
  for (let i = 0; i < header.qdcount; i++) {
    const { question, end } = readQuestion(message, offset);
    questions.push(question);
    offset = end;
  }
  for (let i = 0; i < header.ancount + header.nscount; i++) offset = readRecord(message, offset).end;
  let edns: Edns | undefined;
  for (let i = 0; i < header.arcount; i++) {
    const record = readRecord(message, offset);
    if (record.type === recordTypes.OPT) {
      if (edns) throw malformed('a second OPT record', record.start);
      if (record.name !== '') throw malformed(`OPT record owned by "${record.name}" instead of the root`, record.start);
      edns = { udpSize: record.class, version: (record.ttl >>> 16) & 0xff, dnssecOk: (record.ttl & 0x8000) !== 0 };
    }
    offset = record.end;
  }
  if (offset !== message.length) throw malformed(`${message.length - offset} bytes after the last record`, offset);
  return { header, questions, edns };
}

function ipv4Bytes(address: string): number[] {
  const parts = address.split('.').map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) throw new RangeError(`cannot encode A record: "${address}" is not an IPv4 address`);
  return parts;
}

function writeRecord(writer: MessageWriter, record: DnsRecord): void {
  writer.name(record.name);
  writer.u16(recordTypes[record.type]);
  writer.u16(recordClasses.IN);
  writer.u32(record.ttl);
  const lengthAt = writer.reserve(2);
  const start = writer.length;
  switch (record.type) {
    case 'A':
      writer.bytes(ipv4Bytes(record.address));
      break;
    case 'SRV':
      writer.u16(record.priority);
      writer.u16(record.weight);
      writer.u16(record.port);
      // RFC 2782: the target is never compressed.
      writer.name(record.target, { compress: false });
      break;
    case 'SOA':
      writer.name(record.mname);
      writer.name(record.rname);
      for (const value of [record.serial, record.refresh, record.retry, record.expire, record.minimum]) writer.u32(value);
      break;
  }
  writer.patchU16(lengthAt, writer.length - start);
}

function encode(response: DnsResponse, sections: { answers: DnsRecord[]; authority: DnsRecord[]; additional: DnsRecord[] }, tc: boolean): Buffer {
  const writer = new MessageWriter();
  writer.u16(response.id);
  const flags = 0x8000 | ((response.opcode & 0xf) << 11) | (response.aa ? 0x0400 : 0) | (tc ? 0x0200 : 0) | (response.rd ? 0x0100 : 0) | (response.cd ? 0x0010 : 0) | (response.rcode & 0xf);
  writer.u16(flags);
  writer.u16(response.questions.length);
  writer.u16(sections.answers.length);
  writer.u16(sections.authority.length);
  writer.u16(sections.additional.length + (response.edns ? 1 : 0));
  for (const q of response.questions) {
    writer.name(q.name);
    writer.u16(q.type);
    writer.u16(q.class);
  }
  for (const record of [...sections.answers, ...sections.authority, ...sections.additional]) writeRecord(writer, record);
  if (response.edns) {
    writer.bytes([0]);
    writer.u16(recordTypes.OPT);
    writer.u16(response.edns.udpSize);
    writer.u32(((response.rcode >> 4) & 0xff) << 24);
    writer.u16(0);
  }
  return writer.toBuffer();
}

/**
 * Encodes a response that fits in `maxSize` bytes. Additional records go first (RFC 2181 9: no TC for
 * those); if the answer still does not fit, only the header and question go out, with TC set.
 */
export function encodeResponse(response: DnsResponse, maxSize = 65535): Buffer {
  return encodeResponseWhole(response, maxSize).bytes;
}

/** encodeResponse, and whether the response went out whole (nothing left out to fit `maxSize`). */
export function encodeResponseWhole(response: DnsResponse, maxSize = 65535): { bytes: Buffer; whole: boolean } {
  const full = encode(response, response, false);
  if (full.length <= maxSize) return { bytes: full, whole: true };
  const withoutAdditional = encode(response, { ...response, additional: [] }, false);
  if (withoutAdditional.length <= maxSize) return { bytes: withoutAdditional, whole: false };
  return { bytes: encode(response, { answers: [], authority: [], additional: [] }, true), whole: false };
}

