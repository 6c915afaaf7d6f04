import { spawn } from 'node:child_process';
import type { RemoteInfo, Socket as UdpSocket } from 'node:dgram';
import type { Server, Socket } from 'node:net';
import { parseBalancerConfig, type BalancerConfig, type ParseOptions } from '../contract/balancer-config.js';
import { DataPlaneError, codes, errorMessage } from '../errors.js';
import { describe, isRecord } from '../validate.js';

/**
 * Hot restart of the data plane (nginx's binary upgrade, HAProxy's socket transfer): the running
 * `loopmesh balancer` starts a successor with its own command line, passes it every listening socket
 * over the IPC channel, and stops accepting only once the successor serves on them. The kernel's
 * accept queues are shared meanwhile, so no new connection is refused; the old process then drains
 * its open connections and exits. Node 20 has no SO_REUSEPORT, so this is the way to zero refusals.
 */

/** Set in the successor's environment; its value is the predecessor's pid. */
export const handoverEnv = 'LOOPMESH_HANDOVER_FROM';

export type SocketKind = 'tcp' | 'udp';

export interface ListeningSocket {
  kind: SocketKind;
  /** ADDRESS:PORT as configured, so both processes name a socket the same way. */
  key: string;
  handle: Server | UdpSocket;
}

/**
 * An inherited listening TCP socket. Node starts accepting on it the moment it arrives, before any
 * service has taken it; connections accepted in between wait here (paused), so none is left hanging.
 */
export class InheritedServer {
  private pending: Socket[] = [];
  private readonly hold = (socket: Socket): void => {
    socket.pause();
    // Node's wrapper server is not half-open; the balancer's connections are.
    socket.allowHalfOpen = true;
    this.pending.push(socket);
  };

  constructor(readonly server: Server) {
    server.on('connection', this.hold);
  }

  /** Once the new owner listens on `server`: the connections that arrived before it. */
  adopt(): Socket[] {
    this.server.off('connection', this.hold);
    const held = this.pending;
    this.pending = [];
    return held;
  }

  close(): void {
    for (const socket of this.adopt()) socket.destroy();
    this.server.close();
  }
}

/** An inherited UDP socket; datagrams that arrive before a server takes it are kept for it. */
export class InheritedUdp {
  private pending: Array<[Buffer, RemoteInfo]> = [];
  private readonly hold = (message: Buffer, peer: RemoteInfo): void => {
    if (this.pending.length < 1024) this.pending.push([message, peer]);
  };

  constructor(readonly socket: UdpSocket) {
    socket.on('message', this.hold);
  }

  adopt(): Array<[Buffer, RemoteInfo]> {
    this.socket.off('message', this.hold);
    const held = this.pending;
    this.pending = [];
    return held;
  }

  close(): void {
    this.adopt();
    this.socket.close();
  }
}

/** Listening sockets a successor got from its predecessor; each is taken at most once. */
export class InheritedSockets {
  private readonly tcp = new Map<string, InheritedServer>();
  private readonly udp = new Map<string, InheritedUdp>();

  constructor(readonly config: BalancerConfig | undefined) {}

  add(key: string, socket: InheritedServer | InheritedUdp): void {
    if (socket instanceof InheritedServer) this.tcp.set(key, socket);
    else this.udp.set(key, socket);
  }

  takeTcp(key: string): InheritedServer | undefined {
    const server = this.tcp.get(key);
    this.tcp.delete(key);
    return server;
  }

  takeUdp(key: string): InheritedUdp | undefined {
    const socket = this.udp.get(key);
    this.udp.delete(key);
    return socket;
  }

  get count(): number {
    return this.tcp.size + this.udp.size;
  }

  /** Closes the sockets no service took (it went away meanwhile); returns their keys. */
  releaseRest(): string[] {
    const keys = [...this.tcp.keys(), ...this.udp.keys()];
    for (const server of this.tcp.values()) server.close();
    for (const socket of this.udp.values()) socket.close();
    this.tcp.clear();
    this.udp.clear();
    return keys;
  }
}

type Message =
  | { type: 'hello' }
  | { type: 'socket'; kind: SocketKind; key: string }
  | { type: 'end'; sockets: number; config: string | null }
  | { type: 'started' }
  | { type: 'failed'; message: string };

function parseMessage(value: unknown): Message {
  if (isRecord(value)) {
    const { type } = value;
    if (type === 'hello' || type === 'started') return { type };
    if (type === 'failed' && typeof value.message === 'string') return { type, message: value.message };
    if (type === 'socket' && (value.kind === 'tcp' || value.kind === 'udp') && typeof value.key === 'string') return { type, kind: value.kind, key: value.key };
    if (type === 'end' && typeof value.sockets === 'number' && (typeof value.config === 'string' || value.config === null)) {
      return { type, sockets: value.sockets, config: value.config };
    }
  }
  throw new DataPlaneError(codes.handover, `handover: unexpected message ${describe(value)}; expected hello, socket, end, started or failed`);
}

export interface HandOverOptions {
  sockets: readonly ListeningSocket[];
  /** The config served now (the last good one), which the successor serves first. */
  config: BalancerConfig | undefined;
  /** How long the successor gets to start serving. */
  timeoutMs: number;
  /** The successor's command line; defaults to this process's own. */
  command?: { file: string; args: string[] };
}

/**
 * Predecessor side: starts the successor, hands it the sockets and the config, and resolves with its
 * pid once it serves. Rejects (and kills the successor) if it fails, exits or times out first; the
 * sockets stay open here either way, so a failed handover changes nothing.
 */
export function handOver(options: HandOverOptions): Promise<number> {
  const command = options.command ?? { file: process.execPath, args: [...process.execArgv, ...process.argv.slice(1)] };
  const child = spawn(command.file, command.args, {
    env: { ...process.env, [handoverEnv]: String(process.pid) },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    // Its own session: it outlives this process, and a signal to this process's group spares it.
    detached: true,
  });
  return new Promise<number>((resolve, reject) => {
    let settled = false;
    const finish = (err: Error | undefined): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.off('exit', onExit);
      if (child.connected) child.disconnect();
      if (err) {
        if (child.exitCode === null) child.kill('SIGKILL');
        reject(err);
      } else {
        child.unref();
        resolve(child.pid ?? 0);
      }
    };
    const fail = (message: string): void => finish(new DataPlaneError(codes.handover, `handover to a new balancer process failed: ${message}; this process keeps serving`));
    const timer = setTimeout(() => fail(`the successor did not serve within ${options.timeoutMs} ms`), options.timeoutMs);
    const onExit = (code: number | null, signal: string | null): void => fail(`the successor exited (${signal ?? `code ${code}`}) before it served`);
    child.on('exit', onExit);
    child.on('error', (err) => fail(`cannot start ${command.file}: ${errorMessage(err)}`));
    child.on('message', (raw: unknown) => {
      let message: Message;
      try {
        message = parseMessage(raw);
      } catch (err) {
        return fail(errorMessage(err));
      }
      if (message.type === 'hello') {
        for (const s of options.sockets) child.send({ type: 'socket', kind: s.kind, key: s.key }, s.handle);
        child.send({ type: 'end', sockets: options.sockets.length, config: options.config ? JSON.stringify(options.config) : null });
      } else if (message.type === 'started') {
        finish(undefined);
      } else if (message.type === 'failed') {
        fail(message.message);
      }
    });
  });
}

/**
 * Successor side: in a process started by `handOver`, receives the sockets and the predecessor's
 * config; resolves undefined in any other process.
 */
export function receiveHandover(timeoutMs: number, options: ParseOptions = {}): Promise<InheritedSockets | undefined> {
  if (!process.env[handoverEnv] || !process.send) return Promise.resolve(undefined);
  delete process.env[handoverEnv];
  isSuccessor = true;
  return new Promise((resolve, reject) => {
    // Wrapped the moment it arrives: Node's wrapper server accepts on it at once, and a connection
    // accepted before anyone listens for it would hang unanswered (seen under load as 1 in ~300).
    const pending: Array<{ key: string; socket: InheritedServer | InheritedUdp }> = [];
    const timer = setTimeout(() => done(new DataPlaneError(codes.handover, `handover: no sockets from the predecessor within ${timeoutMs} ms`)), timeoutMs);
    const done = (err: Error | undefined, result?: InheritedSockets): void => {
      clearTimeout(timer);
      process.off('message', onMessage);
      if (err) reject(err);
      else resolve(result);
    };
    const onMessage = (raw: unknown, handle: unknown): void => {
      try {
        const message = parseMessage(raw);
        if (message.type === 'socket') {
          if (!isRecord(handle)) throw new DataPlaneError(codes.handover, `handover: socket ${message.key} arrived without its handle`);
          const socket = message.kind === 'tcp' ? new InheritedServer(handle as unknown as Server) : new InheritedUdp(handle as unknown as UdpSocket);
          pending.push({ key: message.key, socket });
        } else if (message.type === 'end') {
          if (pending.length !== message.sockets) {
            throw new DataPlaneError(codes.handover, `handover: got ${pending.length} sockets, the predecessor sent ${message.sockets}`);
          }
          const inherited = new InheritedSockets(message.config === null ? undefined : parseBalancerConfig(message.config, 'the predecessor\'s config', options));
          for (const s of pending) inherited.add(s.key, s.socket);
          done(undefined, inherited);
        }
      } catch (err) {
        for (const s of pending) s.socket.close();
        done(err instanceof Error ? err : new Error(String(err)));
      }
    };
    process.on('message', onMessage);
    process.send?.({ type: 'hello' });
  });
}

/** Whether this process was started by `handOver` (an IPC channel from elsewhere is not ours to use). */
let isSuccessor = false;

/** Successor side: tells the predecessor how the start went, then lets go of the IPC channel. */
export function reportHandover(result: { started: true } | { started: false; message: string }): Promise<void> {
  return new Promise((resolve) => {
    if (!isSuccessor || !process.send || !process.connected) return resolve();
    const message: Message = result.started ? { type: 'started' } : { type: 'failed', message: result.message };
    process.send(message, undefined, {}, () => {
      if (process.connected) process.disconnect();
      resolve();
    });
  });
}
