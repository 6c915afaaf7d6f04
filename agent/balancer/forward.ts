import type { Socket } from 'node:net';

/**
 * Moves bytes both ways between a client and its backend once both are connected, with half-close:
 * an end on one side ends the other side's writing. The one place balanced bytes are copied, so the
 * speed work of the data plane happens here. Errors, timeouts and closes are the caller's.
 */
export function forwardBoth(client: Socket, upstream: Socket): void {
  client.pipe(upstream);
  upstream.pipe(client);
}
