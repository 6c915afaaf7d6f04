import { createSocket, type RemoteInfo, type Socket as UdpSocket } from 'node:dgram';
import { lookup as dnsLookup } from 'node:dns';
import { createServer, isIP, isIPv6, type Server, type Socket } from 'node:net';
import type { ServiceSpec } from '../contract/balancer-config.js';
import { DnsError, codes, errorCode, errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import type { InheritedSockets, ListeningSocket } from '../hot-restart/handover.js';
import { AnswerCache, readPlainQuery, replyFromCache, type PlainQuery } from './answer-cache.js';
import { answerQuery, type Outcome, type Transport } from './responder.js';
import { FrameReader, frame } from './tcp-frames.js';
import { normalizeName, zoneFromServices, type Zone } from './zone.js';

export interface DnsServerOptions {
  host: string;
  /** 0 picks a free port, the same one for UDP and TCP. */
  port: number;
  logger: Logger;
  suffix: string;
  /** Seconds; short, so a moved service is picked up soon. */
  ttl?: number;
  /** A TCP connection with no traffic between queries for this long is closed (RFC 7766 allows keeping it for more queries). */
  idleTimeoutMs?: number;
  /** A whole TCP query must arrive within this long of its first byte (of accept, for the first), however slowly it trickles. */
  queryDeadlineMs?: number;
  /** TCP connections at once, from all clients together. */
  maxConnections?: number;
  /** TCP connections at once from one client address; a connection over it is closed at once. */
  maxConnectionsPerClient?: number;
  /** Sockets from a predecessor process (hot restart), used instead of binding anew. */
  inherited?: InheritedSockets;
}

export type DnsStats = Record<Outcome, number> & {
  queries: number;
  /** TCP connections open now. */
  tcpOpen: number;
  /** TCP connections closed because a query did not arrive whole within the deadline. */
  tcpDeadline: number;
  /** TCP connections closed at once: over the per-client cap, or every slot taken. */
  tcpLimit: number;
};

export const defaultIdleTimeoutMs = 10_000;
export const defaultQueryDeadlineMs = 5_000;
export const defaultMaxConnections = 256;
export const defaultMaxConnectionsPerClient = 16;

/** Responses a TCP client has not read yet; past this it is not reading, and is cut off. */
const maxUnreadBytes = 1 << 20;
/** After a hang-up, input is still read (and ignored) this long: closing with unread input resets the connection and loses replies already written. */
const lingerMs = 1000;
/** Attempts to find a port free for both UDP and TCP when the port is 0. */
const portAttempts = 10;
/** A client refused over a TCP limit is logged at most once in this long; the stats count every refusal. */
const limitLogIntervalMs = 60_000;
/** Clients remembered for that; past it, ones logged over a minute ago are forgotten. */
const limitLogMaxClients = 4096;

function hostPort(host: string, port: number): string {
  return isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Socket buffers asked for (the kernel caps them at net.core.rmem_max / wmem_max): room for bursts. */
const udpBufferBytes = 4 << 20;

/**
 * Replies go to the address a query came from, always an IP literal: no resolver call, and no
 * deferral to the next tick as dns.lookup makes even for a literal (a name would still be resolved).
 */
function literalLookup(address: string, family: unknown, callback: (err: NodeJS.ErrnoException | null, address: string, family: number) => void): void {
  // Replies mostly go to the same few clients: the last literal seen skips isIP's regular expression.
  if (address === lastLiteral) return callback(null, address, lastLiteralVersion);
  const version = isIP(address);
  if (version !== 0) {
    lastLiteral = address;
    lastLiteralVersion = version;
    return callback(null, address, version);
  }
  dnsLookup(address, { family: family === 6 ? 6 : 4 }, callback);
}
let lastLiteral = '';
let lastLiteralVersion = 0;

/** Larger socket buffers, best effort: a failure only leaves the kernel's default. */
function growBuffers(socket: UdpSocket): void {
  try {
    if (socket.getRecvBufferSize() < udpBufferBytes) socket.setRecvBufferSize(udpBufferBytes);
    if (socket.getSendBufferSize() < udpBufferBytes) socket.setSendBufferSize(udpBufferBytes);
  } catch {
    // e.g. a socket inherited from another Node version that cannot change them: the defaults serve.
  }
}

function bindUdp(host: string, port: number): Promise<UdpSocket> {
  return new Promise((resolve, reject) => {
    const socket = createSocket({ type: isIPv6(host) ? 'udp6' : 'udp4', lookup: literalLookup });
    socket.once('error', (err) => {
      socket.close();
      reject(err);
    });
    socket.bind(port, host, () => {
      socket.removeAllListeners('error');
      resolve(socket);
    });
  });
}

function listenTcp(server: Server, where: { host: string; port: number } | Server): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    const listening = (): void => {
      server.off('error', reject);
      resolve();
    };
    if ('host' in where) server.listen(where.port, where.host, listening);
    else server.listen(where, listening);
  });
}

function closeUdp(socket: UdpSocket): Promise<void> {
  return new Promise((resolve) => socket.close(() => resolve()));
}

/** The DNS responder for the service zone, on UDP and TCP at one address. */
export class DnsServer {
  private zone: Zone;
  /** Replies to plain queries for this zone; replaced with the zone. */
  private cache = new AnswerCache();
  /** Scratch for readPlainQuery: one per server, as messages are handled one at a time. */
  private readonly plain: PlainQuery = { questionEnd: 0, edns: false };
  private udp: UdpSocket | undefined;
  private tcp: Server | undefined;
  private readonly connections = new Set<Socket>();
  /** Open TCP connections per client address, for the per-client cap. */
  private readonly perClient = new Map<string, number>();
  /** When each refused client was last logged, and how many refusals since then went unlogged. */
  private readonly limitLogged = new Map<string, { at: number; unlogged: number }>();
  private readonly counts: Omit<DnsStats, 'tcpOpen'> = { queries: 0, answered: 0, nxdomain: 0, refused: 0, formerr: 0, notimp: 0, dropped: 0, tcpDeadline: 0, tcpLimit: 0 };
  private readonly ttl: number;
  private readonly log: Logger;

  constructor(private readonly options: DnsServerOptions) {
    this.ttl = options.ttl ?? 5;
    this.log = options.logger;
    this.zone = zoneFromServices([], options.suffix, this.ttl);
  }

  /** How a hot restart names this server's sockets: the configured address, the same in both processes. */
  private get handoverKey(): string {
    return `dns ${hostPort(this.options.host, this.options.port)}`;
  }

  /** The UDP and TCP sockets, for a successor process to take over. */
  listeningSockets(): ListeningSocket[] {
    return this.udp && this.tcp
      ? [{ kind: 'udp', key: this.handoverKey, handle: this.udp }, { kind: 'tcp', key: this.handoverKey, handle: this.tcp }]
      : [];
  }

  async start(): Promise<void> {
    if (this.udp) return;
    const { host, port } = this.options;
    const inheritedUdp = this.options.inherited?.takeUdp(this.handoverKey);
    const inheritedTcp = this.options.inherited?.takeTcp(this.handoverKey);
    if (inheritedUdp && inheritedTcp) {
      const tcp = createServer((socket) => this.onConnection(socket));
      await listenTcp(tcp, inheritedTcp.server);
      this.serve(inheritedUdp.socket, tcp);
      // What arrived before this server owned the sockets.
      for (const socket of inheritedTcp.adopt()) {
        this.onConnection(socket);
        socket.resume(); // held paused; a 'data' listener alone does not restart a paused socket
      }
      for (const [message, peer] of inheritedUdp.adopt()) this.onDatagram(message, peer);
      this.log.info({ address: hostPort(host, inheritedUdp.socket.address().port), suffix: this.zone.suffix }, 'DNS responder listening on the sockets of the previous process');
      return;
    }
    inheritedUdp?.close();
    inheritedTcp?.close();
    for (let attempt = 1; ; attempt++) {
      let udp: UdpSocket;
      try {
        udp = await bindUdp(host, port);
      } catch (cause) {
        throw new DnsError(codes.dnsListen, `cannot listen for DNS on udp ${hostPort(host, port)}: ${errorMessage(cause)}`, { cause });
      }
      const actual = udp.address().port;
      const tcp = createServer((socket) => this.onConnection(socket));
      try {
        // The address UDP resolved to, so a host name cannot put TCP on another address family.
        await listenTcp(tcp, { host: udp.address().address, port: actual });
      } catch (cause) {
        await closeUdp(udp);
        if (port === 0 && errorCode(cause) === 'EADDRINUSE' && attempt < portAttempts) continue;
        throw new DnsError(codes.dnsListen, `cannot listen for DNS on tcp ${hostPort(host, actual)}: ${errorMessage(cause)}`, { cause });
      }
      this.serve(udp, tcp);
      this.log.info({ address: hostPort(host, actual), suffix: this.zone.suffix }, 'DNS responder listening (UDP and TCP)');
      return;
    }
  }

  private serve(udp: UdpSocket, tcp: Server): void {
    const maxConnections = this.options.maxConnections ?? defaultMaxConnections;
    tcp.maxConnections = maxConnections;
    // Node closes a connection over maxConnections before 'connection'; it only tells us here.
    tcp.on('drop', (data) => this.refuseOverLimit(clientKey(data?.remoteAddress), `all ${maxConnections} DNS TCP connections are in use`));
    udp.on('message', (message, peer) => this.onDatagram(message, peer));
    udp.on('error', (err) => this.log.warn({ code: errorCode(err) }, `DNS UDP socket error: ${err.message}`));
    tcp.on('error', (err) => this.log.warn({ code: errorCode(err) }, `DNS TCP listener error: ${err.message}`));
    growBuffers(udp);
    this.udp = udp;
    this.tcp = tcp;
  }

  /** The address UDP and TCP both listen on, once started. */
  address(): { host: string; port: number } | undefined {
    return this.udp ? { host: this.options.host, port: this.udp.address().port } : undefined;
  }

  /** Replaces the zone in one assignment: a query sees the old zone or the new one, never a mix. */
  setServices(services: ServiceSpec[]): void {
    const zone = zoneFromServices(services, this.options.suffix, this.ttl);
    const left = services.filter((s) => zone.records.get(normalizeName(s.fqdn))?.service !== s.service);
    for (const s of left) this.log.warn({ service: s.service, fqdn: s.fqdn, address: s.address }, `service not published in DNS: "${s.fqdn}" is not a usable name in zone "${zone.suffix}" with an IPv4 address, or another service has it`);
    this.zone = zone;
    this.cache = new AnswerCache();
  }

  stats(): DnsStats {
    return { ...this.counts, tcpOpen: this.connections.size };
  }

  async close(): Promise<void> {
    const { udp, tcp } = this;
    this.udp = undefined;
    this.tcp = undefined;
    for (const socket of this.connections) socket.destroy();
    await Promise.all([udp && closeUdp(udp), tcp && new Promise<void>((resolve) => tcp.close(() => resolve()))]);
  }

  /**
   * Answers one message; never throws, whatever the bytes. The peer (address and port) is only
   * formatted when something is logged: nothing is allocated for it per query.
   */
  private handle(message: Buffer, transport: Transport, peerAddress: string, peerPort: number): Buffer | null {
    this.counts.queries++;
    try {
      // The fast path: a plain query (checked as strictly as the full decoder would) answered before.
      const plain = readPlainQuery(message, this.plain);
      let key: string | undefined;
      let edns = false;
      const cache = this.cache;
      if (plain) {
        edns = this.plain.edns;
        key = AnswerCache.key(message, this.plain.questionEnd);
        const hit = cache.get(key, edns);
        if (hit) {
          this.counts[hit.outcome]++;
          return replyFromCache(hit, message);
        }
      }
      const reply = answerQuery(message, this.zone, transport);
      this.counts[reply.outcome]++;
      if (reply.error) this.log.debug({ code: reply.error.code, peer: hostPort(peerAddress, peerPort), transport, outcome: reply.outcome }, reply.error.message);
      else if (reply.outcome === 'dropped') this.log.debug({ peer: hostPort(peerAddress, peerPort), transport }, 'DNS message dropped: not a query');
      else if (key !== undefined && reply.response && reply.whole === true) cache.set(key, edns, reply.response, reply.outcome);
      return reply.response;
    } catch (err) {
      this.counts.dropped++;
      this.log.warn({ code: errorCode(err), peer: hostPort(peerAddress, peerPort), transport }, `DNS message dropped, the responder failed: ${errorMessage(err)}`);
      return null;
    }
  }

  private onDatagram(message: Buffer, peer: RemoteInfo): void {
    const udp = this.udp;
    const response = this.handle(message, 'udp', peer.address, peer.port);
    if (!response || !udp) return;
    // A send callback costs a closure and a process.nextTick per reply, and is there only to log a
    // failed send at debug level: it is passed only when that would be logged.
    if (this.log.isLevelEnabled('debug')) {
      udp.send(response, peer.port, peer.address, (err) => {
        if (err) this.log.debug({ code: errorCode(err), peer: hostPort(peer.address, peer.port) }, `DNS response not sent: ${err.message}`);
      });
    } else {
      udp.send(response, peer.port, peer.address);
    }
  }

  /** Counts a connection closed over a TCP limit; logs each client at most once a minute. */
  private refuseOverLimit(client: string, why: string): void {
    this.counts.tcpLimit++;
    const now = Date.now();
    const last = this.limitLogged.get(client);
    if (last && now - last.at < limitLogIntervalMs) {
      last.unlogged++;
      return;
    }
    if (!last && this.limitLogged.size >= limitLogMaxClients) {
      for (const [key, entry] of this.limitLogged) if (now - entry.at >= limitLogIntervalMs) this.limitLogged.delete(key);
      if (this.limitLogged.size >= limitLogMaxClients) return;
    }
    const since = last ? `; ${last.unlogged} more from it since it was last logged` : '';
    this.log.warn({ code: codes.dnsTcpLimit, client, transport: 'tcp' }, `DNS TCP connection from ${client} closed at once: ${why}${since} (logged once a minute per client)`);
    this.limitLogged.set(client, { at: now, unlogged: 0 });
  }

  private onConnection(socket: Socket): void {
    const client = clientKey(socket.remoteAddress);
    const remoteAddress = socket.remoteAddress ?? '?';
    const remotePort = socket.remotePort ?? 0;
    const peer = hostPort(remoteAddress, remotePort);
    const perClientCap = this.options.maxConnectionsPerClient ?? defaultMaxConnectionsPerClient;
    const open = this.perClient.get(client) ?? 0;
    if (open >= perClientCap) {
      socket.on('error', () => undefined);
      socket.destroy();
      this.refuseOverLimit(client, `it already has ${open} open (at most ${perClientCap} per client)`);
      return;
    }
    this.perClient.set(client, open + 1);
    this.connections.add(socket);

    const frames = new FrameReader();
    const deadlineMs = this.options.queryDeadlineMs ?? defaultQueryDeadlineMs;
    let deadline: NodeJS.Timeout | undefined;
    let linger: NodeJS.Timeout | undefined;
    let live = true;
    const hangUp = (why: string, graceful: boolean): void => {
      if (!live) return;
      live = false;
      clearTimeout(deadline);
      this.log.debug({ peer, transport: 'tcp' }, `DNS TCP connection closed: ${why}`);
      if (!graceful) return void socket.destroy();
      socket.end();
      linger = setTimeout(() => socket.destroy(), lingerMs);
    };
    // Runs from a message's first byte and is not reset by later bytes, so trickling cannot hold a slot.
    const startDeadline = (): void => {
      deadline = setTimeout(() => {
        if (!live) return;
        live = false;
        this.counts.tcpDeadline++;
        this.log.debug({ code: codes.dnsTcpDeadline, peer, transport: 'tcp' }, `DNS TCP connection closed: no whole query within ${deadlineMs} ms`);
        socket.destroy();
      }, deadlineMs);
    };
    startDeadline();

    socket.setNoDelay(true);
    socket.setTimeout(this.options.idleTimeoutMs ?? defaultIdleTimeoutMs, () => {
      hangUp('idle', false);
      socket.destroy();
    });
    socket.on('close', () => {
      live = false;
      clearTimeout(deadline);
      clearTimeout(linger);
      this.connections.delete(socket);
      const left = (this.perClient.get(client) ?? 1) - 1;
      if (left > 0) this.perClient.set(client, left);
      else this.perClient.delete(client);
    });
    socket.on('error', (err) => this.log.debug({ code: errorCode(err), peer }, `DNS TCP connection error: ${err.message}`));
    socket.on('data', (chunk: Buffer) => {
      if (!live) return;
      try {
        const messages = frames.push(chunk);
        if (messages.length > 0) {
          clearTimeout(deadline);
          deadline = undefined;
        }
        for (const message of messages) {
          const response = this.handle(message, 'tcp', remoteAddress, remotePort);
          // Empty or headerless frames and responses end the connection: the stream is not DNS.
          if (!response) return hangUp(`a ${message.length}-byte frame that is not a query`, true);
          socket.write(frame(response));
          if (socket.writableLength > maxUnreadBytes) return hangUp('the client does not read its responses', false);
        }
        if (frames.midMessage && deadline === undefined) startDeadline();
      } catch (err) {
        this.log.warn({ code: errorCode(err), peer }, `DNS TCP connection failed: ${errorMessage(err)}`);
        socket.destroy();
      }
    });
  }
}

/** The address a per-client limit counts by; an IPv4 client seen on a dual-stack socket counts as itself. */
function clientKey(address: string | undefined): string {
  if (!address) return '?';
  return address.startsWith('::ffff:') && address.includes('.') ? address.slice('::ffff:'.length) : address;
}
