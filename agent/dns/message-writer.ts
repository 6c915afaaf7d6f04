import { nameToLabels } from './domain-name.js';

/** Pointers hold 14 bits, so only names that start in the first 16 KiB can be pointed at. */
const maxPointerTarget = 0x3fff;

/** A growing buffer for one DNS message, with name compression (RFC 1035 4.1.4). */
export class MessageWriter {
  private buffer = Buffer.alloc(512);
  private used = 0;
  /** Suffix (exact bytes, each label length-prefixed) -> where it was written. */
  private readonly written = new Map<string, number>();

  get length(): number {
    return this.used;
  }

  private grow(bytes: number): number {
    const at = this.used;
    if (at + bytes > this.buffer.length) {
      const bigger = Buffer.alloc(Math.max(this.buffer.length * 2, at + bytes));
      this.buffer.copy(bigger, 0, 0, at);
      this.buffer = bigger;
    }
    this.used += bytes;
    return at;
  }

  // grow() first: it may replace this.buffer, and `this.buffer.write(x, this.grow(n))` would write to the old one.
  u16(value: number): void {
    const at = this.grow(2);
    this.buffer.writeUInt16BE(value & 0xffff, at);
  }

  u32(value: number): void {
    const at = this.grow(4);
    this.buffer.writeUInt32BE(value >>> 0, at);
  }

  bytes(values: ArrayLike<number>): void {
    const at = this.grow(values.length);
    for (let i = 0; i < values.length; i++) this.buffer[at + i] = values[i]!;
  }

  /** Leaves room for a value written later with patchU16 (a record's data length). */
  reserve(bytes: number): number {
    return this.grow(bytes);
  }

  patchU16(at: number, value: number): void {
    this.buffer.writeUInt16BE(value, at);
  }

  name(name: string, options: { compress?: boolean } = {}): void {
    const labels = nameToLabels(name);
    for (let i = 0; i < labels.length; i++) {
      const suffix = labels.slice(i).map((l) => `${l.length}:${l.toString('latin1')}`).join('');
      const earlier = this.written.get(suffix);
      if (earlier !== undefined && options.compress !== false) {
        this.u16(0xc000 | earlier);
        return;
      }
      if (this.used <= maxPointerTarget && earlier === undefined) this.written.set(suffix, this.used);
      const label = labels[i]!;
      this.bytes([label.length]);
      this.bytes(label);
    }
    this.bytes([0]);
  }

  toBuffer(): Buffer {
    return Buffer.from(this.buffer.subarray(0, this.used));
  }
}
