/** DNS over TCP (RFC 1035 4.2.2, RFC 7766): every message is preceded by its length in 2 bytes. */
export class FrameReader {
  /** Bytes received and not yet part of a returned message; joined only when a message completes. */
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** The length of the message being read, once its 2-byte prefix is in; -1 before that. */
  private expected = -1;

  /** Adds a chunk as it came off the socket; returns the messages it completed, in order. */
  push(chunk: Buffer): Buffer[] {
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const frames: Buffer[] = [];
    for (;;) {
      if (this.expected < 0) {
        if (this.buffered < 2) break;
        this.expected = this.take(2).readUInt16BE(0);
      }
      if (this.buffered < this.expected) break;
      frames.push(this.take(this.expected));
      this.expected = -1;
    }
    return frames;
  }

  /** Whether part of a message (even one byte of its length) has arrived and the rest has not. */
  get midMessage(): boolean {
    return this.expected >= 0 || this.buffered > 0;
  }

  /** The first `count` bytes; chunks are joined here, not on every push, so a trickled message costs linear time. */
  private take(count: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.buffered);
    const rest = all.subarray(count);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return all.subarray(0, count);
  }
}

export function frame(message: Buffer): Buffer {
  const prefix = Buffer.alloc(2);
  prefix.writeUInt16BE(message.length);
  return Buffer.concat([prefix, message]);
}
