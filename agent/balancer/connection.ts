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

const ownerOf = Symbol('loopmesh.proxiedConnection');
/** A client or backend socket, and the connection it belongs to (for the shared handlers below). */
interface OwnedSocket extends Socket {
  [ownerOf]?: ProxiedConnection;
}

function owner(socket: Socket): ProxiedConnection | undefined {
  return (socket as OwnedSocket)[ownerOf];
}

// Handlers shared by every connection (`this` is the socket that emitted): an idle connection holds
// no closures of its own.
function onClientError(this: Socket, err: Error): void {
  owner(this)?.clientError(err);
}
function onClientClose(this: Socket): void {
  owner(this)?.clientClose();
}
function onUpstreamError(this: Socket, err: Error): void {
  owner(this)?.upstreamError(err);
}
function onUpstreamClose(this: Socket): void {
  owner(this)?.upstreamClose();
}

/** Nothing tried yet (a connection's sets are made at its first dial, and dropped once forwarding). */
const noneTried: ReadonlySet<Backend> = new Set<Backend>();

/**
 * The idle timeout of every forwarding pair in the process, by one shared timer instead of a socket
 * timeout (a timer, a bound function and a listener) per connection: each sweep compares a pair's
 * bytes read both ways with the last sweep's, and closes a pair with none for its idle timeout. A
 * pair is never closed early; at most one sweep period late (a twentieth of the timeout, at most 5 s:
 * a sweep reads two byte counters per pair, about 1-3 ms for 10,000 pairs on this machine, so with the
 * default hour it runs every 5 s rather than every second).
 */
class IdleSweep {
  private readonly watched = new Set<ProxiedConnection>();
  private timer: NodeJS.Timeout | undefined;
  private periodMs = 0;

  add(connection: ProxiedConnection, idleTimeoutMs: number): void {
    this.watched.add(connection);
    const period = Math.min(5000, Math.max(10, Math.floor(idleTimeoutMs / 20)));
    if (this.timer && period >= this.periodMs) return;
    if (this.timer) clearInterval(this.timer);
    this.periodMs = period;
    this.timer = setInterval(sweep, period);
    this.timer.unref();
  }

  delete(connection: ProxiedConnection): void {
    if (!this.watched.delete(connection) || this.watched.size > 0 || !this.timer) return;
    clearInterval(this.timer);
    this.timer = undefined;
    this.periodMs = 0;
  }

  sweep(): void {
    const now = Math.floor(performance.now());
    for (const connection of this.watched) connection.checkIdle(now);
  }
}

const idleSweep = new IdleSweep();
function sweep(): void {
  idleSweep.sweep();
}

export class ProxiedConnection implements Cuttable {
  private tried: Set<Backend> | undefined;
  private triedGateways: Set<Backend> | undefined;
  /** Every direct backend was down when the connection came: the gateways first, then the backends. */
  private gatewayFirst = false;
  private dialing: { socket: Socket; timer: NodeJS.Timeout } | undefined;
  private upstream: Socket | undefined;
  /** The backend forwarded to, once forwarding. */
  private target: Target | undefined;
  /** The backend sent its first bytes (passive health: a reset after that is not its failure). */
  private answered = false;
  private clientClosed = false;
  private upstreamClosed = true;
  private finished = false;
  private admitted = false;
  private ticket: Ticket | undefined;
  /** Idle timeout of this pair (read when forwarding starts), bytes both ways at the last sweep that saw any, and when. */
  private idleTimeoutMs = 0;
  private idleBytes = 0;
  private idleSince = 0;

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
    (client as OwnedSocket)[ownerOf] = this;
    client.on('error', onClientError);
    client.on('close', onClientClose);
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

  clientError(err: Error): void {
    this.context.logger.debug({ code: errorCode(err), err: errorMessage(err) }, 'client connection error');
    if (this.upstream) this.reset(this.upstream);
    this.destroy();
  }

  clientClose(): void {
    if (this.clientClosed) return;
    this.clientClosed = true;
    if (this.dialing) this.abortDial();
    if (this.upstream && !closedCleanly(this.client)) this.upstream.destroy();
    this.maybeDone();
  }

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
    idleSweep.delete(this);
    this.upstream?.destroy();
    this.client.destroy();
  }

  /**
   * What to dial next: each backend at most once, then each gateway at most once (the last resort
   * after the retries); while every backend is down (a partition), the gateways come first.
   */
  private next(): Target | undefined {
    const { pool, gateways } = this.context;
    const [first, second] = this.gatewayFirst ? [gateways, pool] : [pool, gateways];
    const one = first.pick((first === pool ? this.tried : this.triedGateways) ?? noneTried);
    if (one) return { backend: one, pool: first };
    const other = second.pick((second === pool ? this.tried : this.triedGateways) ?? noneTried);
    return other ? { backend: other, pool: second } : undefined;
  }

  private dialNext(target: Target | undefined): void {
    if (this.clientClosed) return;
    if (!target) {
      this.context.counters.failedConnections++;
      const tried = this.tried?.size ?? 0;
      const triedGateways = this.triedGateways?.size ?? 0;
      const gateways = triedGateways > 0 ? ` and ${triedGateways} gateways` : '';
      this.context.onNoBackend(tried + triedGateways === 0 ? 'no backends' : `all ${tried} backends${gateways} failed`);
      this.client.destroy();
      return;
    }
    const { backend, pool } = target;
    if (pool === this.context.pool) (this.tried ??= new Set()).add(backend);
    else (this.triedGateways ??= new Set()).add(backend);
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

  private forward(upstream: Socket, target: Target, reads: PooledReads): void {
    const { client, context } = this;
    const { backend, pool } = target;
    this.upstream = upstream;
    this.target = target;
    this.upstreamClosed = false;
    // Only the dial needed them.
    this.tried = undefined;
    this.triedGateways = undefined;
    backend.activeConnections++;
    backend.totalConnections++;
    backend.connections.add(this);
    context.forwarding.add(this);
    pool.forwarded(backend);
    if (pool !== context.pool) context.counters.gatewayConnections++;
    context.onForwarded();
    upstream.setNoDelay(true);
    // An onread socket emits no 'data' events: the first bytes are told by the pooled reads.
    reads.onFirstBytes(() => {
      this.answered = true;
      pool.succeeded(backend);
    });
    (upstream as OwnedSocket)[ownerOf] = this;
    upstream.on('error', onUpstreamError);
    upstream.on('close', onUpstreamClose);
    // Bytes read either way: every byte through the pair is read from one side or the other.
    this.idleTimeoutMs = context.idleTimeoutMs;
    this.idleBytes = client.bytesRead + upstream.bytesRead;
    this.idleSince = Math.floor(performance.now());
    idleSweep.add(this, this.idleTimeoutMs);
    forwardBoth(client, upstream, reads);
  }

  /** From the idle sweep: closes both sides after idleTimeoutMs without a byte either way. */
  checkIdle(now: number): void {
    const upstream = this.upstream;
    if (!upstream) return;
    const bytes = this.client.bytesRead + upstream.bytesRead;
    if (bytes !== this.idleBytes) {
      this.idleBytes = bytes;
      this.idleSince = now;
      return;
    }
    if (now - this.idleSince < this.idleTimeoutMs) return;
    this.context.logger.debug({ backend: this.target?.backend.spec.id, idleTimeoutMs: this.idleTimeoutMs }, 'idle timeout; closing both sides');
    this.destroy();
  }

  upstreamError(err: Error): void {
    const target = this.target;
    if (!target) return;
    const { backend, pool } = target;
    this.context.logger.debug({ backend: backend.spec.id, code: errorCode(err), err: errorMessage(err) }, 'backend connection error');
    // A reset before the backend said anything is a failure of the backend (passive health).
    if (!this.answered) pool.failed(backend, 'reset', 0);
    // A cut backend stream must reach the client as a reset: a clean close would read as a complete answer.
    this.reset(this.client);
    this.destroy();
  }

  upstreamClose(): void {
    const { client, context, upstream, target } = this;
    if (this.upstreamClosed || !upstream || !target) return;
    const { backend, pool } = target;
    this.upstreamClosed = true;
    idleSweep.delete(this);
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
    else if (!this.answered) pool.succeeded(backend);
    this.maybeDone();
  }

  private maybeDone(): void {
    if (this.finished || !this.clientClosed || !this.upstreamClosed || this.dialing) return;
    this.finished = true;
    if (this.admitted) this.context.counters.activeConnections--;
    this.ticket?.leave();
    this.onDone(this);
  }
}
