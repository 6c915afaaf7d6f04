import { lookup as dnsLookup, type LookupAddress } from 'node:dns';
import { connect, isIP, type LookupFunction, type Socket } from 'node:net';
import type { Logger } from '../log.js';
import { codes, errorCode, errorMessage } from '../errors.js';
import type { Admission, Ticket } from './admission.js';
import type { Backend, BackendPool, Cuttable } from './backend-pool.js';
import { forwardBoth, pooledReads, type PooledReads } from './forward.js';
import type { LatencyRecorder } from './latency.js';

/** Counters of one service, shared by its current listener and any listener draining after a move. */
export interface ServiceCounters {
  activeConnections: number;
  totalConnections: number;
  failedConnections: number;
  retries: number;
  /** Connections forwarded through a gateway (the proxy cluster) because no direct connect worked. */
  gatewayConnections: number;
  /** Bytes of closed forwarded connections, read from clients (in) and from backends (out); open ones are in `forwarding`. */
  bytesIn: number;
  bytesOut: number;
}

export interface ConnectionContext {
  pool: BackendPool;
  /** The service's gateways (the proxy cluster): the last resort, or the first choice while every backend is down. */
  gateways: BackendPool;
  counters: ServiceCounters;
  /** Connections forwarded to a backend and not closed yet: their bytes so far count in status(). */
  forwarding: Set<ProxiedConnection>;
  /** Successful connects by time taken. */
  latency: LatencyRecorder;
  /** The service's connection limit and queue. */
  admission: Admission;
  /** Read per connection: a KV traffic document may change it. */
  readonly connectTimeoutMs: number;
  /** A forwarding pair with no bytes either way for this long is closed on both sides. */
  readonly idleTimeoutMs: number;
  /** Already bound to the service. */
  logger: Logger;
  /** Whether address:port is one of this balancer's own listeners (a backend there loops). */
  isOwnListener(address: string, port: number): boolean;
  /** Called when no backend could take a connection. */
  onNoBackend(reason: string): void;
  onForwarded(): void;
}

function timeoutError(backend: Backend, ms: number): Error {
  return Object.assign(new Error(`connect to ${backend.label} timed out after ${ms} ms`), { code: 'ETIMEDOUT' });
}

/** Backends already reported as one of our own listeners: said once, not once per connection. */
const selfWarned = new WeakSet<Backend>();

function closedCleanly(socket: Socket): boolean {
  return socket.readableEnded && socket.writableFinished;
}

/**
 * One client connection: dials backends in round-robin order, each at most once, while the client's
 * bytes wait in its paused socket; then forwards both ways with half-close.
 */
/** A backend to dial, and the pool it belongs to (the service's backends, or its gateways). */
interface Target {
  backend: Backend;
  pool: BackendPool;
}

export class ProxiedConnection implements Cuttable {
  private readonly tried = new Set<Backend>();
  private readonly triedGateways = new Set<Backend>();
  /** Every direct backend was down when the connection came: the gateways first, then the backends. */
  private gatewayFirst = false;
  private dialing: { socket: Socket; timer: NodeJS.Timeout } | undefined;
  private upstream: Socket | undefined;
  private clientClosed = false;
  private upstreamClosed = true;
  private finished = false;
  private ticket: Ticket | undefined;

  constructor(
    private readonly client: Socket,
    private readonly context: ConnectionContext,
    private readonly onDone: (connection: ProxiedConnection) => void,
  ) {}

  start(): void {
    const { client, context } = this;
    context.counters.totalConnections++;
    client.setNoDelay(true);
    // Until the upstream is piped in, early bytes stay buffered here and then in the kernel.
    client.pause();
    client.on('error', (err) => {
      context.logger.debug({ code: errorCode(err), err: errorMessage(err) }, 'client connection error');
      if (this.upstream) this.reset(this.upstream);
      this.destroy();
    });
    client.once('close', () => {
      this.clientClosed = true;
      if (this.dialing) this.abortDial();
      if (this.upstream && !closedCleanly(client)) this.upstream.destroy();
      this.maybeDone();
    });
    this.ticket = context.admission.enter(
      () => {
        if (this.clientClosed) return;
        context.counters.activeConnections++;
        this.admitted = true;
        this.gatewayFirst = context.gateways.list().length > 0 && context.pool.unreachable();
        this.dialNext(this.next());
      },
      // Over the limit: a reset tells the client at once (a clean close would look like an empty answer).
      () => this.reset(client),
    );
  }

  private admitted = false;

  /** Bytes so far, while forwarding: read from the client, and from the backend. */
  bytes(): { in: number; out: number } {
    return { in: this.client.bytesRead, out: this.upstream?.bytesRead ?? 0 };
  }

  /** The drain policy of a removed backend: both sides reset. */
  cut(): void {
    if (this.upstream) this.reset(this.upstream);
    this.reset(this.client);
    this.destroy();
  }

  destroy(): void {
    if (this.dialing) this.abortDial();
    this.client.setTimeout(0);
    this.upstream?.destroy();
    this.client.destroy();
  }

  /**
   * What to dial next: each backend at most once, then each gateway at most once (the last resort
   * after the retries); while every backend is down (a partition), the gateways come first.
   */
  private next(): Target | undefined {
    const { pool, gateways } = this.context;
    const order: Array<[BackendPool, Set<Backend>]> = [[pool, this.tried], [gateways, this.triedGateways]];
    if (this.gatewayFirst) order.reverse();
    for (const [from, tried] of order) {
      const backend = from.pick(tried);
      if (backend) return { backend, pool: from };
    }
    return undefined;
  }

  private dialNext(target: Target | undefined): void {
    if (this.clientClosed) return;
    if (!target) {
      this.context.counters.failedConnections++;
      const gateways = this.triedGateways.size > 0 ? ` and ${this.triedGateways.size} gateways` : '';
      this.context.onNoBackend(this.tried.size + this.triedGateways.size === 0 ? 'no backends' : `all ${this.tried.size} backends${gateways} failed`);
      this.client.destroy();
      return;
    }
    const { backend, pool } = target;
    (pool === this.context.pool ? this.tried : this.triedGateways).add(backend);
    const own = (address: string): boolean => this.context.isOwnListener(address.replace(/^::ffff:/, ''), backend.spec.port);
    const literal = isIP(backend.spec.address) !== 0;
    if (literal && own(backend.spec.address)) {
      // Dialing our own listener would accept a connection that dials again, and so on: never dial.
      this.refuseSelf(target);
      return;
    }
    const lookup: LookupFunction = (hostname, options, callback) => {
      dnsLookup(hostname, options, (err, address, family) => {
        const addresses = Array.isArray(address) ? address.map((a: LookupAddress) => a.address) : [address];
        if (!err && addresses.some((a) => own(a))) {
          callback(Object.assign(new Error(`${hostname} resolves to one of loopmesh's own listeners`), { code: codes.balancerSelfBackend }), '', 4);
          return;
        }
        (callback as (e: NodeJS.ErrnoException | null, a: string | LookupAddress[], f?: number) => void)(err, address, family);
      });
    };
    const started = performance.now();
    // The backend's bytes are read into pooled buffers: a fresh 64 KiB buffer per read, freed by
    // the GC, cost more CPU than the copying on bulk transfers (see forward.ts).
    const reads = pooledReads();
    // An IP literal needs no lookup, and was checked against our listeners above.
    const socket = connect({ host: backend.spec.address, port: backend.spec.port, allowHalfOpen: true, ...(literal ? {} : { lookup }), onread: reads.onread });
    const connectTimeoutMs = this.context.connectTimeoutMs;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      onFailure(timeoutError(backend, connectTimeoutMs));
    }, connectTimeoutMs);
    const onFailure = (err: Error): void => {
      this.abortDial();
      // A failure weighs at least a connect timeout in the latency p2c-ewma compares.
      pool.failed(backend, timedOut ? 'timeout' : 'connect', Math.max(performance.now() - started, connectTimeoutMs));
      const next = this.next();
      // Every backend failed for this connection and a gateway is next: the service is cut off from here.
      if (pool === this.context.pool && next && next.pool !== pool) pool.sweptDown();
      this.context.logger.debug(
        { backend: backend.spec.id, code: errorCode(err), err: errorMessage(err), retry: next?.backend.spec.id },
        'backend connect failed',
      );
      if (next && !this.clientClosed) this.context.counters.retries++;
      this.dialNext(next);
    };
    const onConnect = (): void => {
      // A host name that leads back to one of our own listeners would dial itself once per accepted
      // connection until file descriptors run out. (An IP literal was checked before dialing: this
      // saves a getpeername per connection.)
      const remote = literal ? '' : (socket.remoteAddress ?? '').replace(/^::ffff:/, '');
      if (!literal && this.context.isOwnListener(remote, socket.remotePort ?? 0)) {
        this.abortDial();
        this.refuseSelf(target);
        return;
      }
      socket.off('error', onFailure);
      clearTimeout(timer);
      this.dialing = undefined;
      const elapsedMs = performance.now() - started;
      pool.connected(backend, elapsedMs);
      this.context.latency.observe(elapsedMs / 1000);
      this.forward(socket, target, reads);
    };
    socket.once('error', onFailure);
    socket.once('connect', onConnect);
    this.dialing = { socket, timer };
  }

  /** A backend that is one of our own listeners: counted as a failed connect, the next one tried. */
  private refuseSelf({ backend, pool }: Target): void {
    pool.failed(backend, 'connect', this.context.connectTimeoutMs);
    if (selfWarned.has(backend)) return this.dialNext(this.next());
    selfWarned.add(backend);
    this.context.logger.warn({ code: codes.balancerSelfBackend, backend: backend.spec.id }, `backend ${backend.label} is one of loopmesh's own listeners; refused (a connection would loop)`);
    this.dialNext(this.next());
  }

  /** Destroys with an RST rather than a FIN, where the socket is still open. */
  private reset(socket: Socket): void {
    if (socket.destroyed || socket.connecting) return;
    socket.resetAndDestroy();
  }

  private abortDial(): void {
    if (!this.dialing) return;
    const { socket, timer } = this.dialing;
    this.dialing = undefined;
    clearTimeout(timer);
    socket.removeAllListeners('connect');
    socket.removeAllListeners('error');
    // A late error from a socket we gave up on must not be unhandled.
    socket.on('error', () => undefined);
    socket.destroy();
  }

  private forward(upstream: Socket, { backend, pool }: Target, reads: PooledReads): void {
    const { client, context } = this;
    this.upstream = upstream;
    this.upstreamClosed = false;
    backend.activeConnections++;
    backend.totalConnections++;
    backend.connections.add(this);
    context.forwarding.add(this);
    pool.forwarded(backend);
    if (pool !== context.pool) context.counters.gatewayConnections++;
    context.onForwarded();
    upstream.setNoDelay(true);
    let answered = false;
    // An onread socket emits no 'data' events: the first bytes are told by the pooled reads.
    reads.onFirstBytes(() => {
      answered = true;
      pool.succeeded(backend);
    });
    upstream.on('error', (err) => {
      context.logger.debug({ backend: backend.spec.id, code: errorCode(err), err: errorMessage(err) }, 'backend connection error');
      // A reset before the backend said anything is a failure of the backend (passive health).
      if (!answered) pool.failed(backend, 'reset', 0);
      // A cut backend stream must reach the client as a reset: a clean close would read as a complete answer.
      this.reset(client);
      this.destroy();
    });
    // Socket timeouts count reads and writes, and every byte through the pair is both on the client socket.
    client.setTimeout(context.idleTimeoutMs, () => {
      context.logger.debug({ backend: backend.spec.id, idleTimeoutMs: context.idleTimeoutMs }, 'idle timeout; closing both sides');
      this.destroy();
    });
    upstream.once('close', () => {
      this.upstreamClosed = true;
      backend.activeConnections--;
      backend.connections.delete(this);
      context.forwarding.delete(this);
      // Read counts only grow (bytesWritten may drop pending bytes at a destroy): counted once, at close.
      const bytesIn = client.bytesRead;
      const bytesOut = upstream.bytesRead;
      backend.bytesIn += bytesIn;
      backend.bytesOut += bytesOut;
      context.counters.bytesIn += bytesIn;
      context.counters.bytesOut += bytesOut;
      if (!closedCleanly(upstream)) client.destroy();
      else if (!answered) pool.succeeded(backend);
      this.maybeDone();
    });
    forwardBoth(client, upstream, reads);
  }

  private maybeDone(): void {
    if (this.finished || !this.clientClosed || !this.upstreamClosed || this.dialing) return;
    this.finished = true;
    if (this.admitted) this.context.counters.activeConnections--;
    this.ticket?.leave();
    this.onDone(this);
  }
}
