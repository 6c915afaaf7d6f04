import { once } from 'node:events';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { TestContext } from 'node:test';
import { Worker } from 'node:worker_threads';
import assert from 'node:assert/strict';
import { Balancer, type BalancerOptions, type ServiceStatus } from '../../../agent/balancer/balancer.js';
import type { BackendSpec, BalancerConfig, ServiceSpec } from '../../../agent/contract/balancer-config.js';
import { silentLogger } from '../../../agent/log.js';

/**
 * A backend that greets with "<id>\n", echoes what it gets, and on the client's end answers
 * "bye <id>\n" before ending, so a test sees which backend served and that half-close works.
 */
export interface TestBackend {
  id: string;
  port: number;
  spec: BackendSpec;
  server: Server;
  connections: number;
  close(): Promise<void>;
}

export async function startBackend(t: TestContext, id: string): Promise<TestBackend> {
  const sockets = new Set<Socket>();
  const server = createServer({ allowHalfOpen: true }, (socket) => {
    backend.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    socket.write(`${id}\n`);
    socket.on('data', (chunk) => socket.write(chunk));
    socket.on('end', () => socket.end(`bye ${id}\n`));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as AddressInfo).port;
  const close = async (): Promise<void> => {
    if (!server.listening) return;
    const closed = once(server, 'close');
    server.close();
    for (const socket of sockets) socket.destroy();
    await closed;
  };
  const backend: TestBackend = { id, port, spec: { id, address: '127.0.0.1', port }, server, connections: 0, close };
  t.after(close);
  return backend;
}

/** A backend address where nothing listens: connecting is refused. */
export async function deadBackend(id: string): Promise<BackendSpec> {
  return { id, address: '127.0.0.1', port: await freePort('127.0.0.1') };
}

const blackHoleWorker = `
const { createServer } = require('node:net');
const { parentPort, workerData } = require('node:worker_threads');
const server = createServer();
server.listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => {
  parentPort.postMessage(server.address().port);
  Atomics.wait(new Int32Array(workerData), 0, 0);
});
`;

/**
 * A backend whose connects hang: a listener on a blocked thread never accepts, and once its accept
 * queue is full the kernel drops new SYNs, as with a host that does not answer.
 */
export async function blackHoleBackend(t: TestContext, id: string): Promise<BackendSpec> {
  const release = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(blackHoleWorker, { eval: true, workerData: release.buffer });
  const fillers: Socket[] = [];
  t.after(async () => {
    Atomics.store(release, 0, 1);
    Atomics.notify(release, 0);
    await worker.terminate();
    for (const socket of fillers) socket.destroy();
  });
  const [port] = (await once(worker, 'message')) as [number];
  for (let i = 0; i < 10; i++) {
    const socket = connect({ host: '127.0.0.1', port });
    socket.on('error', () => undefined);
    fillers.push(socket);
    const connected = await Promise.race([
      once(socket, 'connect').then(() => true),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 300)),
    ]);
    if (!connected) return { id, address: '127.0.0.1', port };
  }
  throw new Error('could not fill the accept queue of the black hole listener');
}

/** A port that is free on every one of `hosts` (found by listening on port 0 on the first). */
export async function freePort(...hosts: [string, ...string[]]): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = await listenAndRelease(hosts[0], 0);
    const others = await Promise.all(hosts.slice(1).map((host) => listenAndRelease(host, port).catch(() => undefined)));
    if (others.every((p) => p === port)) return port;
  }
  throw new Error(`no port free on all of ${hosts.join(', ')}`);
}

async function listenAndRelease(host: string, port: number): Promise<number> {
  const server = createServer();
  server.listen(port, host);
  await once(server, 'listening');
  const bound = (server.address() as AddressInfo).port;
  server.close();
  await once(server, 'close');
  return bound;
}

/** A client that records everything it receives. */
export class TestClient {
  received = '';
  ended = false;
  /** Resolves when the other side ended or the socket closed, whichever comes first. */
  readonly hungUp: Promise<void>;
  private readonly waiters = new Set<() => void>();

  constructor(readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.received += chunk;
      this.notify();
    });
    socket.on('end', () => {
      this.ended = true;
      this.notify();
    });
    socket.on('error', () => undefined);
    this.hungUp = new Promise((resolve) => {
      socket.once('end', () => resolve());
      socket.once('close', () => resolve());
    });
  }

  /** Resolves once `text` was received; rejects after `ms`. */
  waitFor(text: string, ms = 3000): Promise<void> {
    return this.waitUntil(() => this.received.includes(text), `"${text}" (received ${JSON.stringify(this.received)})`, ms);
  }

  waitForEnd(ms = 3000): Promise<void> {
    return this.waitUntil(() => this.ended, 'end', ms);
  }

  private waitUntil(done: () => boolean, what: string, ms: number): Promise<void> {
    if (done()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!done()) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
      }, ms);
      this.waiters.add(check);
    });
  }

  private notify(): void {
    for (const waiter of [...this.waiters]) waiter();
  }
}

export function dial(t: TestContext, address: string, port: number): TestClient {
  const client = new TestClient(connect({ host: address, port, allowHalfOpen: true }));
  t.after(() => client.socket.destroy());
  return client;
}

/** Resolves with the first line the balancer relays: the id of the backend that took the connection. */
export async function servedBy(t: TestContext, address: string, port: number): Promise<string> {
  const client = dial(t, address, port);
  await client.waitFor('\n');
  client.socket.destroy();
  return client.received.split('\n')[0] ?? '';
}

/** Resolves whether `ms` passed without the promise settling. */
export async function stillPending(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let settled = false;
  void promise.then(
    () => (settled = true),
    () => (settled = true),
  );
  await new Promise((resolve) => setTimeout(resolve, ms));
  return !settled;
}

export function service(name: string, address: string, port: number, backends: BackendSpec[], extra: Partial<ServiceSpec> = {}): ServiceSpec {
  return { service: name, name, fqdn: `${name}.local`, address, port, policy: 'round-robin', empty: 'reject', backends, ...extra };
}

export function config(...services: ServiceSpec[]): BalancerConfig {
  return { version: 1, services };
}

export function waitUntil(check: () => boolean, what: string, ms = 3000): Promise<void> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const poll = (): void => {
      if (check()) return resolve();
      if (Date.now() - started > ms) return reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
      setTimeout(poll, 10);
    };
    poll();
  });
}

/** A balancer for one test, closed after it. */
export function startBalancer(t: TestContext, options: Partial<BalancerOptions> = {}): Balancer {
  const balancer = new Balancer({ logger: silentLogger(), connectTimeoutMs: 1000, drainTimeoutMs: 5000, ...options });
  t.after(() => balancer.close());
  return balancer;
}

/** The balancer's status of one service, which must be there. */
export function status(balancer: Balancer, name: string): ServiceStatus {
  const found = balancer.snapshot().find((s) => s.service === name);
  assert.ok(found, `service ${name} in the snapshot`);
  return found;
}
