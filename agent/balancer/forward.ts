import type { OnReadOpts, Socket } from 'node:net';

/**
 * Bytes one direction may hold in the writing socket's buffer (beyond what the kernel took) before
 * the reading socket is paused: a few 64 KiB reads, so a bulk transfer does not stop and start
 * reading at every chunk (stream.pipe() pauses at 16 KiB), while a slow reader still holds at most
 * this plus one read per direction in memory.
 */
export const maxBufferedBytes = 256 * 1024;

/** Size of a pooled read buffer (libuv's and Node's read size). */
const readSize = 64 * 1024;
/** Free read buffers kept for reuse, process-wide (4 MiB at most); more are left to the GC. */
const poolLimit = 64;
const pool: Buffer[] = [];
/** Reads up to this size are copied out rather than written from the pooled buffer. */
const copyBelow = 4096;

function takeBuffer(): Buffer {
  return pool.pop() ?? Buffer.allocUnsafeSlow(readSize);
}

function releaseBuffer(buffer: Buffer): void {
  if (pool.length < poolLimit) pool.push(buffer);
}

/**
 * Reads of a backend socket into pooled buffers, for `net.connect({ ..., onread: reads.onread })`,
 * then handed to forwardBoth(client, upstream, reads). Without it every 64 KiB read allocates a new
 * ArrayBuffer that only the GC frees again, which costs more CPU than the copying itself on bulk
 * transfers. A buffer goes back to the pool only when the write that carries its bytes to the
 * client has completed (its callback), so bytes are never overwritten before they are sent.
 */
export interface PooledReads {
  readonly onread: OnReadOpts;
  /** Set by forwardBoth: where the bytes go, and how the reading side pauses. */
  attach(from: Socket, to: Socket): void;
  /** `listener` runs once, at the first bytes read: an onread socket emits no 'data' events. */
  onFirstBytes(listener: () => void): void;
}

export function pooledReads(): PooledReads {
  let from: Socket | undefined;
  let to: Socket | undefined;
  /** Bytes read before forwardBoth attached (a backend that speaks first): copied, sent on attach. */
  let early: Buffer[] = [];
  let first: (() => void) | undefined;
  return {
    onread: {
      buffer: takeBuffer,
      callback: (bytes: number, buffer: Uint8Array): boolean => {
        const read = buffer as Buffer;
        if (first) {
          const listener = first;
          first = undefined;
          listener();
        }
        if (!to || !from) {
          early.push(Buffer.from(read.subarray(0, bytes)));
          releaseBuffer(read);
          return true;
        }
        if (to.destroyed) {
          releaseBuffer(read);
          return true;
        }
        let sent: boolean;
        if (bytes <= copyBelow) {
          // A small read (a typical answer): copied out (from Node's shared slab, no new
          // ArrayBuffer), so the buffer is free for the next read and the write needs no callback.
          sent = to.write(Buffer.from(read.subarray(0, bytes)));
          releaseBuffer(read);
        } else sent = to.write(read.subarray(0, bytes), () => releaseBuffer(read));
        if (!sent && to.writableLength > maxBufferedBytes) from.pause();
        return true;
      },
    },
    attach(source: Socket, target: Socket): void {
      from = source;
      to = target;
      for (const chunk of early) target.write(chunk);
      early = [];
    },
    onFirstBytes(listener: () => void): void {
      first = listener;
    },
  };
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
export function forwardBoth(client: Socket, upstream: Socket, reads?: PooledReads): void {
  oneWay(client, upstream, undefined);
  oneWay(upstream, client, reads);
}

function oneWay(from: Socket, to: Socket, reads: PooledReads | undefined): void {
  if (reads) reads.attach(from, to);
  else {
    from.on('data', (chunk: Buffer) => {
      // write() returns false from 16 KiB on, and then 'drain' is due once the buffer empties:
      // pausing only past maxBufferedBytes still always gets that 'drain'.
      if (!to.write(chunk) && to.writableLength > maxBufferedBytes) from.pause();
    });
  }
  to.on('drain', () => {
    if (from.isPaused()) from.resume();
  });
  // The client may have sent its end while the caller dialed (net emits 'end' on a paused socket
  // with nothing buffered): then it is passed on at once, as pipe() does.
  if (from.readableEnded) to.end();
  else from.once('end', () => to.end());
  // The caller paused the client while it dialed: flowing from here on.
  if (from.isPaused()) from.resume();
}
