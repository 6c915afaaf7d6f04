import { headerSize, classicUdpSize, recordTypes } from './packet.js';
import type { Outcome } from './responder.js';

/**
 * Answers to the common query, kept per zone: the fast path of the responder.
 *
 * A message is looked up only when it is the plain shape of a query, checked byte by byte here: QR 0,
 * opcode QUERY, one question whose name has no compression pointer, no answer or authority records,
 * and either nothing after the question or exactly one OPT record (owned by the root, EDNS version 0)
 * that ends the message. Every check answerQuery's full decoder makes on such a message is made here
 * too; anything else (and any miss) goes the full way, and only what that produced, without error,
 * is stored. The reply is then a pure function of the question's bytes (name as sent, type, class)
 * and of whether there was an OPT record: the message ID and the RD and CD bits, which the reply
 * copies from the query, are patched into a copy of the stored bytes. Only replies of at most 512
 * bytes are stored: those go out whole on every transport and EDNS buffer size (never truncated).
 */
export interface CachedAnswer {
  /** The reply with ID 0 and RD, CD clear. */
  bytes: Buffer;
  outcome: Outcome;
}

/** Entries at most; when full the cache starts over, so names sent in ever new letter cases cannot grow it. */
export const maxCachedAnswers = 8192;
/** The largest reply stored: it fits every transport and UDP size unchanged. */
export const maxCachedReplyBytes = classicUdpSize;

/** Where the question ends, and whether an OPT record follows; -1 when the message is not the plain shape. */
export interface PlainQuery {
  questionEnd: number;
  edns: boolean;
}

/**
 * Checks that `message` is a plain query (see above), strictly, without allocating; returns false
 * for anything else, which then takes the full decoder (and gets its FORMERR, NOTIMP or drop).
 */
export function readPlainQuery(message: Buffer, into: PlainQuery): boolean {
  const length = message.length;
  if (length < headerSize + 5) return false;
  // QR clear and opcode 0 (QUERY): the top five bits of the third byte.
  if ((message[2]! & 0xf8) !== 0) return false;
  // QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 0 or 1.
  if (message[4] !== 0 || message[5] !== 1 || message[6] !== 0 || message[7] !== 0 || message[8] !== 0 || message[9] !== 0 || message[10] !== 0) return false;
  const arcount = message[11]!;
  if (arcount > 1) return false;
  // The name: labels of 1 to 63 bytes (no pointers, no extended label types), 255 bytes in all.
  let offset = headerSize;
  let wire = 1;
  for (;;) {
    if (offset >= length) return false;
    const label = message[offset]!;
    if (label === 0) break;
    if (label > 63) return false;
    wire += label + 1;
    if (wire > 255) return false;
    offset += label + 1;
  }
  const questionEnd = offset + 5;
  if (questionEnd > length) return false;
  if (arcount === 0) {
    if (questionEnd !== length) return false;
    into.questionEnd = questionEnd;
    into.edns = false;
    return true;
  }
  // One OPT record: root owner (0), type 41, class = UDP size, TTL = extended rcode, version (0), flags; then its data, ending the message.
  const opt = questionEnd;
  if (opt + 11 > length) return false;
  if (message[opt] !== 0 || message[opt + 1] !== 0 || message[opt + 2] !== recordTypes.OPT) return false;
  if (message[opt + 6] !== 0) return false;
  const dataLength = (message[opt + 9]! << 8) | message[opt + 10]!;
  if (opt + 11 + dataLength !== length) return false;
  into.questionEnd = questionEnd;
  into.edns = true;
  return true;
}

/** The stored answers of one zone, by question bytes, with and without EDNS. */
export class AnswerCache {
  private plain = new Map<string, CachedAnswer>();
  private edns = new Map<string, CachedAnswer>();
  private size = 0;

  /** The question's bytes as a key (latin1: one char per byte). */
  static key(message: Buffer, questionEnd: number): string {
    return message.toString('latin1', headerSize, questionEnd);
  }

  get(key: string, edns: boolean): CachedAnswer | undefined {
    return (edns ? this.edns : this.plain).get(key);
  }

  /** Stores `reply` (as the full path made it for a plain query) unless it is too big to fit everywhere. */
  set(key: string, edns: boolean, reply: Buffer, outcome: Outcome): void {
    if (reply.length > maxCachedReplyBytes || reply.length < headerSize) return;
    if (this.size >= maxCachedAnswers) this.clear();
    const bytes = Buffer.from(reply);
    bytes[0] = 0;
    bytes[1] = 0;
    bytes[2]! &= ~0x01;
    bytes[3]! &= ~0x10;
    const map = edns ? this.edns : this.plain;
    if (!map.has(key)) this.size++;
    map.set(key, { bytes, outcome });
  }

  clear(): void {
    this.plain = new Map();
    this.edns = new Map();
    this.size = 0;
  }

  get entries(): number {
    return this.size;
  }
}

/** The stored reply for `query`: a copy with the query's ID, RD and CD. */
export function replyFromCache(answer: CachedAnswer, query: Buffer): Buffer {
  const source = answer.bytes;
  const reply = Buffer.allocUnsafe(source.length);
  source.copy(reply, 0);
  reply[0] = query[0]!;
  reply[1] = query[1]!;
  reply[2] = source[2]! | (query[2]! & 0x01);
  reply[3] = source[3]! | (query[3]! & 0x10);
  return reply;
}
