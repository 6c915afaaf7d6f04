import type { OnReadOpts, Socket } from 'node:net';

/**
 * Bytes one direction may hold in the writing socket's buffer (beyond what the kernel took) before
 * the reading socket is paused: a few 64 KiB reads, so a bulk transfer does not stop and start
 * reading at every chunk (stream.pipe() pauses at 16 KiB), while a slow reader still holds at most
 * this plus one read per direction in memory.
 */
export const maxBufferedBytes = 256 * 1024;

/** Size of a read (libuv's and Node's read size), and of a pooled buffer. */
const readSize = 64 * 1024;
/** Free buffers kept for reuse, process-wide (4 MiB at most); more are left to the GC. */
const poolLimit = 64;
const pool: Buffer[] = [];
/** Reads up to this size are copied into a small buffer (Node's shared slab) rather than a pooled one. */
const copyBelow = 4096;
/**
 * The one buffer every pooled-read socket reads into (`onread.buffer`). A socket holds its onread
 * buffer for as long as it is open, idle or not: one 64 KiB buffer per socket was 64 KiB of external
 * memory (and a few resident pages) per idle connection. One shared buffer is safe because a read
 * and its callback run synchronously on the one thread: the callback copies the bytes out before
 * any other socket reads.
 */
const scratch = Buffer.allocUnsafeSlow(readSize);

function takeBuffer(): Buffer {
  return pool.pop() ?? Buffer.allocUnsafeSlow(readSize);
}

function releaseBuffer(buffer: Buffer): void {
  if (pool.length < poolLimit) pool.push(buffer);
}

/**
 * Reads of a backend socket through one shared read buffer, for `net.connect({ ..., onread:
 * reads.onread })`, then handed to forwardBoth(client, upstream, reads). Without onread every 64 KiB
 * read allocates a new ArrayBuffer that only the GC frees again, which costs more CPU than copying on
 * bulk transfers. Each read is copied out of the shared buffer at once: a small one into Node's
 * shared slab, a large one into a pooled buffer that goes back to the pool when the write carrying
 * it to the client has completed (its callback), so bytes are never overwritten before they are sent.
 */
export interface PooledReads {
  readonly onread: OnReadOpts;
  /** Set by forwardBoth: where the bytes go, and how the reading side pauses. */
  attach(from: Socket, to: Socket): void;
  /** `listener` runs once, at the first bytes read: an onread socket emits no 'data' events. */
  onFirstBytes(listener: () => void): void;
}

class Reads implements PooledReads {
  private from: Socket | undefined;
  private to: Socket | undefined;
  /** Bytes read before forwardBoth attached (a backend that speaks first): copied, sent on attach. */
  private early: Buffer[] | undefined;
  private first: (() => void) | undefined;

  get onread(): OnReadOpts {
    return { buffer: scratch, callback: (bytes: number, buffer: Uint8Array): boolean => this.read(bytes, buffer as Buffer) };
  }

  private read(bytes: number, read: Buffer): boolean {
    const first = this.first;
    if (first) {
      this.first = undefined;
      first();
    }
    const { from, to } = this;
    if (!to || !from) {
      (this.early ??= []).push(Buffer.from(read.subarray(0, bytes)));
      return true;
    }
    if (to.destroyed) return true;
    let sent: boolean;
    if (bytes <= copyBelow) {
      // A small read (a typical answer): the write needs no callback.
      sent = to.write(Buffer.from(read.subarray(0, bytes)));
    } else {
      const copy = takeBuffer();
      read.copy(copy, 0, 0, bytes);
      sent = to.write(copy.subarray(0, bytes), () => releaseBuffer(copy));
    }
    if (!sent && to.writableLength > maxBufferedBytes) from.pause();
    return true;
  }

  attach(source: Socket, target: Socket): void {
    this.from = source;
    this.to = target;
    const early = this.early;
    this.early = undefined;
    for (const chunk of early ?? []) target.write(chunk);
  }

  onFirstBytes(listener: () => void): void {
    this.first = listener;
  }
}

export function pooledReads(): PooledReads {
  return new Reads();
}

/**
 * Moves bytes both ways between a client and its backend once both are connected, with half-close:
 * an end on one side ends the other side's writing. The one place balanced bytes are copied, so the
 * speed work of the data plane happens here. Errors, timeouts and closes are the caller's.
 *
 * Not stream.pipe(): a 'data' listener that writes the chunk it is handed (each read is its own
 * Buffer, so it stays intact until written) and pauses its source only when the other side holds
 * more than maxBufferedBytes, resuming on 'drain'. Three listeners a direction instead of pipe()'s
 * eight. With `reads` (the upstream was connected with `onread: reads.onread`), the backend's bytes
 * come in pooled buffers instead of fresh ones.
 */
const peerOf = Symbol('loopmesh.forwardPeer');
/** A forwarded socket and the one its bytes go to (each side of a pair names the other). */
interface PairedSocket extends Socket {
  [peerOf]?: Socket;
}

function peer(socket: Socket): Socket | undefined {
  return (socket as PairedSocket)[peerOf];
}

// Handlers shared by every pair (`this` is the socket that emitted): no closures per connection.
function onData(this: Socket, chunk: Buffer): void {
  const to = peer(this);
  // write() returns false from 16 KiB on, and then 'drain' is due once the buffer empties:
  // pausing only past maxBufferedBytes still always gets that 'drain'.
  if (to && !to.write(chunk) && to.writableLength > maxBufferedBytes) this.pause();
}

/** The writing side drained: the side that feeds it reads again. */
function onDrain(this: Socket): void {
  const from = peer(this);
  if (from?.isPaused()) from.resume();
}

function onEnd(this: Socket): void {
  peer(this)?.end();
}

export function forwardBoth(client: Socket, upstream: Socket, reads?: PooledReads): void {
  (client as PairedSocket)[peerOf] = upstream;
  (upstream as PairedSocket)[peerOf] = client;
  oneWay(client, upstream, undefined);
  oneWay(upstream, client, reads);
}

function oneWay(from: Socket, to: Socket, reads: PooledReads | undefined): void {
  if (reads) reads.attach(from, to);
  else from.on('data', onData);
  to.on('drain', onDrain);
  // The client may have sent its end while the caller dialed (net emits 'end' on a paused socket
  // with nothing buffered): then it is passed on at once, as pipe() does.
  if (from.readableEnded) to.end();
  else from.on('end', onEnd);
  // The caller paused the client while it dialed: flowing from here on.
  if (from.isPaused()) from.resume();
}
