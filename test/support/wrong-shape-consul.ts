import { createServer, request, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/** How /v1/health/service/NAME is answered while a service is switched to a wrong shape. */
export type WrongShape = 'object' | 'junk-entry' | 'truncated' | 'http-500';

const hopByHop = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te', 'trailer']);

function forwardable(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  return Object.fromEntries(Object.entries(headers).filter(([name]) => !hopByHop.has(name.toLowerCase())));
}

/**
 * A stub for the one fault a real Consul cannot be made to produce: a wrong-shaped answer. An HTTP
 * proxy in front of a real Consul that forwards every request and answer as they are (method, path,
 * query with index/wait, X-Consul-* headers both ways, bodies), except /v1/health/service/NAME for the
 * services switched to a wrong shape, whose answer (read from the real Consul) is rewritten.
 */
export class WrongShapeConsulProxy {
  url = '';
  private readonly shapes = new Map<string, WrongShape>();
  private readonly rewrittenCount = new Map<string, number>();
  private readonly upstreamRequests = new Set<ReturnType<typeof request>>();

  private constructor(
    private readonly upstream: URL,
    private readonly server: Server,
  ) {}

  static async start(upstreamUrl: string): Promise<WrongShapeConsulProxy> {
    let proxy: WrongShapeConsulProxy | undefined;
    const server = createServer((req, res) => proxy?.handle(req, res));
    proxy = new WrongShapeConsulProxy(new URL(upstreamUrl), server);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', resolve);
    });
    proxy.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    return proxy;
  }

  /** From now on, answer /v1/health/service/SERVICE with this shape (until heal). */
  wrongShape(service: string, shape: WrongShape): void {
    this.shapes.set(service, shape);
  }

  /** Forward SERVICE's answers as they are again (every service when none is named). */
  heal(service?: string): void {
    if (service === undefined) this.shapes.clear();
    else this.shapes.delete(service);
  }

  /** How many answers for SERVICE were rewritten so far. */
  rewritten(service: string): number {
    return this.rewrittenCount.get(service) ?? 0;
  }

  async close(): Promise<void> {
    for (const up of this.upstreamRequests) up.destroy();
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const target = new URL(req.url ?? '/', this.upstream);
    const match = /^\/v1\/health\/service\/([^/]+)$/.exec(target.pathname);
    const service = match?.[1] === undefined ? undefined : decodeURIComponent(match[1]);
    const shape = service === undefined ? undefined : this.shapes.get(service);
    if (service !== undefined && shape !== undefined) this.rewrittenCount.set(service, this.rewritten(service) + 1);
    if (shape === 'http-500') {
      req.resume();
      res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end('rpc error making call: stub failure (WrongShapeConsulProxy)');
      return;
    }
    const headers = { ...forwardable(req.headers), host: target.host };
    // The answer to rewrite must come back as plain JSON text.
    if (shape !== undefined) delete headers['accept-encoding'];
    const up = request(target, { method: req.method, headers }, (answer) => {
      if (shape === undefined || answer.statusCode !== 200) {
        res.writeHead(answer.statusCode ?? 502, forwardable(answer.headers));
        answer.pipe(res);
        return;
      }
      const chunks: Buffer[] = [];
      answer.on('data', (c: Buffer) => chunks.push(c));
      answer.on('end', () => {
        const body = rewrite(shape, Buffer.concat(chunks).toString('utf8'));
        const out = { ...forwardable(answer.headers), 'content-length': String(Buffer.byteLength(body)) };
        res.writeHead(200, out).end(body);
      });
    });
    this.upstreamRequests.add(up);
    up.on('close', () => this.upstreamRequests.delete(up));
    up.on('error', () => {
      if (!res.headersSent) res.writeHead(502).end();
      else res.destroy();
    });
    // A long poll the agent gives up on (stop, timeout) is given up upstream too.
    res.on('close', () => {
      if (!res.writableFinished) up.destroy();
    });
    req.pipe(up);
  }
}

function rewrite(shape: Exclude<WrongShape, 'http-500'>, text: string): string {
  const entries = JSON.parse(text) as Array<Record<string, unknown>>;
  switch (shape) {
    case 'object':
      // One entry where the list of entries belongs.
      return JSON.stringify(entries[0] ?? { Node: {}, Service: {}, Checks: [] });
    case 'junk-entry':
      // The real entries, and one that has a Node but no Service and no Checks.
      return JSON.stringify([...entries, { Node: { Node: 'junk', Address: '192.0.2.1' } }]);
    case 'truncated':
      return text.slice(0, Math.floor(text.length / 2));
  }
}
