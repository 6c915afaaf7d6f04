import { DnsError, codes } from '../errors.js';
import {
  classicUdpSize,
  decodeHeader,
  decodeQuery,
  type DnsHeader,
  type DnsQuery,
  type DnsQuestion,
  type DnsRecord,
  type DnsResponse,
  ednsUdpSize,
  encodeResponseWhole,
  headerSize,
  opcodes,
  rcodes,
  recordClasses,
  recordTypes,
} from './packet.js';
import { findName, type Zone, type ZoneMatch } from './zone.js';

export type Transport = 'udp' | 'tcp';

/** How a message was handled; the server counts these. BADVERS counts as formerr. */
export type Outcome = 'answered' | 'nxdomain' | 'refused' | 'formerr' | 'notimp' | 'dropped';

export interface DnsReply {
  /** null: send nothing. */
  response: Buffer | null;
  outcome: Outcome;
  /** Why a message was dropped or refused as malformed. */
  error?: DnsError;
  /** False when records were left out (or TC set) to fit the transport's size limit. */
  whole?: boolean;
}

type Sections = Pick<DnsResponse, 'answers' | 'authority' | 'additional'>;

const noRecords: Sections = { answers: [], authority: [], additional: [] };

function soa(zone: Zone): DnsRecord {
  const apex = zone.suffix;
  return { name: apex, ttl: zone.ttl, type: 'SOA', mname: `ns.${apex}`, rname: `hostmaster.${apex}`, serial: 1, refresh: 3600, retry: 600, expire: 86400, minimum: zone.ttl };
}

function recordsFor(match: ZoneMatch, question: DnsQuestion, zone: Zone): Sections {
  const ttl = zone.ttl;
  const negative: Sections = { ...noRecords, authority: [soa(zone)] };
  const type = question.type;
  const wantsA = type === recordTypes.A || type === recordTypes.ANY;
  const wantsSrv = type === recordTypes.SRV || type === recordTypes.ANY;
  switch (match.kind) {
    case 'apex':
      return type === recordTypes.SOA || type === recordTypes.ANY ? { ...noRecords, answers: [{ ...soa(zone), name: question.name }] } : negative;
    case 'host':
    case 'service': {
      const address: DnsRecord = { name: match.fqdn, ttl, type: 'A', address: match.record.address };
      const srv: DnsRecord = { name: question.name, ttl, type: 'SRV', priority: 0, weight: 1, port: match.record.port, target: match.fqdn };
      const answers: DnsRecord[] = [];
      if (match.kind === 'host' && wantsA) answers.push({ ...address, name: question.name });
      if (wantsSrv) answers.push(srv);
      if (answers.length === 0) return negative;
      return { answers, authority: [], additional: wantsSrv && !(match.kind === 'host' && wantsA) ? [address] : [] };
    }
    default:
      return negative;
  }
}

/**
 * Answers one DNS message from the zone, never recursing. Pure: the same bytes and zone give the
 * same reply. Malformed input never throws; it becomes FORMERR (or a drop when there is no header).
 */
export function answerQuery(message: Buffer, zone: Zone, transport: Transport = 'udp'): DnsReply {
  if (message.length < headerSize) {
    return { response: null, outcome: 'dropped', error: new DnsError(codes.dnsMalformed, `malformed DNS message: ${message.length} bytes, shorter than the ${headerSize}-byte header`) };
  }
  const header = decodeHeader(message);
  if (header.qr) return { response: null, outcome: 'dropped' };

  const reply = (rcode: number, outcome: Outcome, extra: Partial<DnsResponse> = {}, maxSize = 65535): DnsReply => {
    const { bytes, whole } = encodeResponseWhole({ id: header.id, opcode: header.opcode, aa: false, rd: header.rd, cd: header.cd, rcode, questions: [], ...noRecords, ...extra }, maxSize);
    return { outcome, response: bytes, whole };
  };
  const formerr = (error: DnsError): DnsReply => ({ ...reply(rcodes.FORMERR, 'formerr'), error });

  if (header.opcode !== opcodes.QUERY) return reply(rcodes.NOTIMP, 'notimp', { questions: readableQuestions(message, header) });
  if (header.qdcount !== 1) return formerr(new DnsError(codes.dnsMalformed, `malformed DNS message: ${header.qdcount} questions, expected exactly 1`));

  let query: DnsQuery;
  try {
    query = decodeQuery(message);
  } catch (err) {
    if (err instanceof DnsError) return formerr(err);
    throw err;
  }
  const question = query.questions[0]!;
  const questions = [question];
  const edns = query.edns ? { udpSize: ednsUdpSize } : undefined;
  if (query.edns && query.edns.version > 0) return reply(rcodes.BADVERS, 'formerr', { questions, edns });

  const maxSize = transport === 'tcp' ? 65535 : Math.min(Math.max(query.edns?.udpSize ?? classicUdpSize, classicUdpSize), ednsUdpSize);
  // Only class IN has data here; other classes are REFUSED, like any name we do not serve.
  if (question.class !== recordClasses.IN) return reply(rcodes.REFUSED, 'refused', { questions, edns }, maxSize);

  const match = findName(zone, question.name);
  if (match.kind === 'outside') return reply(rcodes.REFUSED, 'refused', { questions, edns }, maxSize);
  const sections = recordsFor(match, question, zone);
  const rcode = match.kind === 'missing' ? rcodes.NXDOMAIN : rcodes.NOERROR;
  return reply(rcode, rcode === rcodes.NXDOMAIN ? 'nxdomain' : 'answered', { aa: true, questions, edns, ...sections }, maxSize);
}

/** The response to send for `message`, or null to drop it. */
export function respond(message: Buffer, zone: Zone, transport: Transport = 'udp'): Buffer | null {
  return answerQuery(message, zone, transport).response;
}

/** For NOTIMP: echo the question when the message happens to hold one we can read. */
function readableQuestions(message: Buffer, header: DnsHeader): DnsQuestion[] {
  if (header.qdcount !== 1) return [];
  try {
    return decodeQuery(message).questions;
  } catch {
    return [];
  }
}
