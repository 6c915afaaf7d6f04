import { createServer, connect, type Server, type Socket } from 'node:net';

/** A port free right now on 127.0.0.1 (TCP). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** A TCP backend that greets every connection with its id, then echoes. */
export interface IdServer {
  id: string;
  port: number;
  server: Server;
  sockets: Set<Socket>;
  close(): Promise<void>;
}

export function startIdServer(id: string, host = '127.0.0.1', port = 0): Promise<IdServer> {
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    socket.write(`${id}\n`);
    socket.pipe(socket);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      resolve({
        id,
        port: (server.address() as { port: number }).port,
        server,
        sockets,
        close: () =>
          new Promise<void>((r) => {
            for (const s of sockets) s.destroy();
            server.close(() => r());
          }),
      });
    });
  });
}

/** Connects, reads the greeting line; resolves the id or rejects with the connection error. */
export function whoAnswers(host: string, port: number, timeoutMs = 3000): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port });
    let data = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no greeting from ${host}:${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('data', (chunk) => {
      data += chunk.toString();
      const nl = data.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        socket.destroy();
        resolve(data.slice(0, nl));
      }
    });
    socket.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.on('close', () => {
      clearTimeout(timer);
      reject(new Error(`connection to ${host}:${port} closed before a greeting`));
    });
  });
}

/** Polls `fn` until it returns a truthy value or the deadline passes. */
export async function eventually<T>(fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
}

/** An open client connection that echoes: `ping` proves it still works end to end. */
export async function openConnection(address: string, port: number): Promise<{ socket: Socket; greeting: string; ping: (text: string) => Promise<string> }> {
  const socket = connect({ host: address, port });
  const lines: string[] = [];
  const waiters: Array<(line: string) => void> = [];
  let buffer = '';
  socket.on('data', (chunk) => {
    buffer += chunk.toString();
    for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      const waiter = waiters.shift();
      if (waiter) waiter(line);
      else lines.push(line);
    }
  });
  socket.on('error', () => undefined);
  const next = (): Promise<string> =>
    new Promise((resolve, reject) => {
      const line = lines.shift();
      if (line !== undefined) return resolve(line);
      const timer = setTimeout(() => reject(new Error('no line within 3 s')), 3000);
      waiters.push((l) => {
        clearTimeout(timer);
        resolve(l);
      });
    });
  const greeting = await next();
  return {
    socket,
    greeting,
    ping: async (text) => {
      socket.write(`${text}\n`);
      return next();
    },
  };
}

/** New connections every `everyMs` until stopped: how many failed, and how many there were. */
export function steadyLoad(address: string, port: number, everyMs = 20): { stop: () => Promise<{ ok: number; failed: string[] }> } {
  let running = true;
  const failed: string[] = [];
  let ok = 0;
  const loop = (async () => {
    while (running) {
      try {
        await whoAnswers(address, port, 2000);
        ok++;
      } catch (err) {
        failed.push((err as Error).message);
      }
      await new Promise((r) => setTimeout(r, everyMs));
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return { ok, failed };
    },
  };
}
