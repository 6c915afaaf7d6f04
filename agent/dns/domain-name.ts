import { DnsError, codes } from '../errors.js';

/**
 * Domain names on the wire (RFC 1035 3.1, 4.1.4) and in presentation form: labels joined by dots,
 * no trailing dot, the root as "". Bytes that are not printable ASCII, and "." or "\" inside a label,
 * are escaped (\DDD, \., \\), so a name read from a packet survives the round trip byte for byte and
 * toLowerCase() folds ASCII letters only, as DNS does.
 */
export const maxLabelLength = 63;
export const maxNameLength = 255;

export function malformed(what: string, offset: number): DnsError {
  return new DnsError(codes.dnsMalformed, `malformed DNS message: ${what} at offset ${offset}`);
}

function escapeLabel(bytes: Buffer): string {
  let out = '';
  for (const byte of bytes) {
    if (byte === 0x2e || byte === 0x5c) out += `\\${String.fromCharCode(byte)}`;
    else if (byte > 0x20 && byte < 0x7f) out += String.fromCharCode(byte);
    else out += `\\${byte.toString().padStart(3, '0')}`;
  }
  return out;
}

/** Reads a possibly compressed name starting at `start`; `end` is the offset right after it in the message. */
export function readName(message: Buffer, start: number): { name: string; end: number } {
  const labels: string[] = [];
  let offset = start;
  let end = -1;
  let wireLength = 1;
  // Every pointer must jump to before the previous jump's target: the chain is finite, no loop can form.
  let lowestTarget = start;
  for (;;) {
    const length = message[offset];
    if (length === undefined) throw malformed('name runs past the end of the message', offset);
    const kind = length & 0xc0;
    if (kind === 0xc0) {
      const low = message[offset + 1];
      if (low === undefined) throw malformed('compression pointer cut off by the end of the message', offset);
      const target = ((length & 0x3f) << 8) | low;
      if (target >= lowestTarget) throw malformed(`compression pointer to offset ${target} does not point backwards (a loop)`, offset);
      if (end < 0) end = offset + 2;
      lowestTarget = target;
      offset = target;
      continue;
    }
    if (kind !== 0) throw malformed(`label length byte 0x${length.toString(16)} (labels are at most ${maxLabelLength} bytes; extended label types are not supported)`, offset);
    if (length === 0) break;
    if (offset + 1 + length > message.length) throw malformed(`label of ${length} bytes runs past the end of the message`, offset);
    wireLength += length + 1;
    if (wireLength > maxNameLength) throw malformed(`name longer than ${maxNameLength} bytes`, offset);
    labels.push(escapeLabel(message.subarray(offset + 1, offset + 1 + length)));
    offset += 1 + length;
  }
  return { name: labels.join('.'), end: end < 0 ? offset + 1 : end };
}

/** Presentation form -> wire labels; throws a RangeError for a name that cannot be encoded. */
export function nameToLabels(name: string): Buffer[] {
  if (name === '' || name === '.') return [];
  const labels: Buffer[] = [];
  let bytes: number[] = [];
  let total = 1;
  const finish = (): void => {
    if (bytes.length === 0 || bytes.length > maxLabelLength) throw new RangeError(`cannot encode DNS name "${name}": label of ${bytes.length} bytes (expected 1 to ${maxLabelLength})`);
    total += bytes.length + 1;
    labels.push(Buffer.from(bytes));
    bytes = [];
  };
  const text = name.endsWith('.') && !name.endsWith('\\.') ? name.slice(0, -1) : name;
  const chars = Array.from(text);
  for (let i = 0; i < chars.length; i++) {
    const char = chars[i]!;
    if (char === '.') {
      finish();
    } else if (char === '\\') {
      const digits = /^\d{3}/.exec(chars.slice(i + 1, i + 4).join(''));
      if (digits && Number(digits[0]) < 256) {
        bytes.push(Number(digits[0]));
        i += 3;
      } else {
        bytes.push(...Buffer.from(chars[i + 1] ?? '\\', 'utf8'));
        i += 1;
      }
    } else {
      bytes.push(...Buffer.from(char, 'utf8'));
    }
  }
  finish();
  if (total > maxNameLength) throw new RangeError(`cannot encode DNS name "${name}": ${total} bytes on the wire (expected at most ${maxNameLength})`);
  return labels;
}

/** Whether a name can go into a message (labels of 1 to 63 bytes, 255 bytes in all). */
export function isEncodableName(name: string): boolean {
  try {
    nameToLabels(name);
    return true;
  } catch {
    return false;
  }
}
