import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '../log.js';
import type { InheritedSockets } from '../hot-restart/handover.js';
import { errorCode, errorMessage } from '../errors.js';

export function addressKey(address: string, port: number): string {
  return `${address}:${port}`;
}

/** A connection accepted by a listener, started once the listener tracks it. */
export interface AcceptedConnection {
  start(): void;
  destroy(): void;
}

export interface ServiceListenerOptions {
  address: string;
  port: number;
  /** Already bound to the service. */
  logger: Logger;
  /** Sockets from a predecessor process (hot restart): one for this address is used instead of a new bind. */
  inherited?: InheritedSockets;
  /** Wraps a client socket; the connection calls `done` once it is fully closed. */
  onConnection(client: Socket, done: (connection: AcceptedConnection) => void): AcceptedConnection;
}

/** One listening socket of a service, and the connections it accepted, which outlive its closing. */
export class ServiceListener {
  readonly server: Server;
  readonly key: string;
  private readonly connections = new Set<AcceptedConnection>();
  private drainTimer: NodeJS.Timeout | undefined;
  private accepting = false;
  private everListened = false;
  private readonly closed: Promise<void>;
  private onDrained: (() => void) | undefined;

  constructor(private readonly options: ServiceListenerOptions) {
    this.key = addressKey(options.address, options.port);
    this.server = createServer({ allowHalfOpen: true });
    this.server.on('connection', (client) => this.accept(client));
    this.closed = new Promise((resolve) => this.server.once('close', () => resolve()));
  }

  get listening(): boolean {
    return this.accepting;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Rejects with the listen error (EADDRINUSE, EADDRNOTAVAIL, EACCES...). */
  listen(): Promise<void> {
    const { server, options } = this;
    return new Promise((resolve, reject) => {
      const onError = (err: Error): void => reject(err);
      server.once('error', onError);
      // An inherited socket is already bound and listening; the kernel's accept queue is shared with
      // the predecessor until it closes its copy, so no connection is refused in between.
      const inherited = options.inherited?.takeTcp(this.key);
      const onListening = (): void => {
        // Connections the inherited socket accepted before this listener owned it.
        for (const client of inherited?.adopt() ?? []) this.accept(client);
        server.off('error', onError);
        server.on('error', (err) => {
          options.logger.error({ address: this.key, code: errorCode(err), err: errorMessage(err) }, 'listener error');
        });
        this.accepting = true;
        this.everListened = true;
        resolve();
      };
      if (inherited) server.listen(inherited.server, onListening);
      else server.listen({ host: options.address, port: options.port }, onListening);
    });
  }

  stopAccepting(): void {
    if (!this.accepting) return;
    this.accepting = false;
    this.server.close();
  }

  /** Stops accepting; open connections keep flowing and are destroyed after `timeoutMs`. */
  drain(timeoutMs: number, onDrained: () => void): void {
    this.stopAccepting();
    this.onDrained = onDrained;
    if (this.connections.size === 0) return this.finishDrain();
    this.drainTimer = setTimeout(() => {
      this.options.logger.info(
        { address: this.key, connections: this.connections.size },
        'drain deadline reached; closing remaining connections',
      );
      this.destroyConnections();
    }, timeoutMs);
    this.drainTimer.unref();
  }

  /** Stops accepting, destroys every connection, and resolves once the socket is closed. */
  async destroy(): Promise<void> {
    this.stopAccepting();
    this.destroyConnections();
    if (this.everListened) await this.closed;
  }

  /** One function per listener, not per connection: a connection hands itself back when closed. */
  private readonly release = (done: AcceptedConnection): void => {
    this.connections.delete(done);
    if (this.onDrained && this.connections.size === 0) this.finishDrain();
  };

  private accept(client: Socket): void {
    const connection = this.options.onConnection(client, this.release);
    this.connections.add(connection);
    connection.start();
  }

  private destroyConnections(): void {
    for (const connection of [...this.connections]) connection.destroy();
  }

  private finishDrain(): void {
    if (this.drainTimer) clearTimeout(this.drainTimer);
    this.drainTimer = undefined;
    const onDrained = this.onDrained;
    this.onDrained = undefined;
    onDrained?.();
  }
}
