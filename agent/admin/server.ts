import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Endpoint } from '../config/config.js';
import { AdminError, codes } from '../errors.js';
import type { Logger } from '../log.js';
import { isLoopbackHost } from '../config/config.js';
import { misdirected } from './host.js';
import type { StatusReport } from './report.js';
import { Metrics } from './metrics.js';
import { prefersHtml, statusPage, statusPageHeaders } from './page.js';

export interface AdminServerOptions {
  endpoint: Endpoint;
  /** Called on every request by whichever process hosts the admin (the agent, or `loopmesh balancer`; with --workers, asynchronously). */
  report: () => StatusReport | Promise<StatusReport>;
  logger: Logger;
  /** The process's metrics (the agent's has its control-plane series); default: the data plane's and the process's. */
  metrics?: Metrics;
}

/** The agent's Consul connection; a `loopmesh balancer` process has none. */
function consulLine(consul: StatusReport['consul']): string {
  if (!consul) return 'balancer process (serves the rendered files, no Consul)';
  return `consul ${consul.connected ? 'connected' : 'UNREACHABLE (serving last-known-good)'}`;
}

/** Loopback HTTP: /health, /v1/routes (what `loopmesh status` shows), /metrics, and / for people. */
export class AdminServer {
  private readonly server: Server;
  private readonly metrics: Metrics;

  constructor(private readonly options: AdminServerOptions) {
    this.metrics = options.metrics ?? new Metrics();
    this.server = createServer((req, res) => {
      this.handle(req, res).catch((err: unknown) => {
        if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(`cannot build the report: ${err instanceof Error ? err.message : String(err)}\n`);
      });
    });
  }

  start(): Promise<void> {
    const { host, port } = this.options.endpoint;
    return new Promise((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException): void =>
        reject(new AdminError(codes.adminListen, `admin HTTP cannot listen on ${host}:${port}: ${err.code ?? err.message}; pick another with --admin ADDR:PORT or --admin off`, { cause: err }));
      this.server.once('error', onError);
      this.server.listen(port, host, () => {
        this.server.off('error', onError);
        // Config refuses this without --admin-public; with it, say so on every start.
        if (!isLoopbackHost(host)) this.options.logger.warn({ code: codes.adminPublic, admin: this.url() }, `admin HTTP listens on ${this.url()}, outside loopback (--admin-public): whoever reaches it reads this node's routes and metrics`);
        resolve();
      });
    });
  }

  url(): string {
    const a = this.server.address() as AddressInfo | null;
    return a ? `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : '';
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = new URL(req.url ?? '/', 'http://admin').pathname;
    const send = (status: number, type: string, body: string): void => {
      res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
      res.end(body);
    };
    const refused = misdirected({ host: req.headers.host, adminHost: this.options.endpoint.host, adminPort: (this.server.address() as AddressInfo).port, localAddress: req.socket.localAddress, peer: req.socket.remoteAddress });
    if (refused !== undefined) {
      // DNS rebinding: a browser page whose name now points here sends its own name as Host.
      this.options.logger.debug({ code: codes.adminHost, peer: req.socket.remoteAddress }, refused);
      res.setHeader('x-content-type-options', 'nosniff');
      return send(421, 'text/plain; charset=utf-8', `misdirected request: ${refused}\n`);
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') return send(405, 'text/plain', 'expected GET\n');
    // Liveness (Consul's check of a gateway): this process answers, so its data plane's loop runs. A
    // gateway with one route not served still serves the others, and a node tries the next gateway.
    if (path === '/health/live') return send(200, 'application/json', '{"status":"live"}\n');
    const report = await this.options.report();
    switch (path) {
      case '/health':
        // 200 only when every route is served and the last render succeeded; 503 says why not.
        return send(report.health.status === 'ok' ? 200 : 503, 'application/json', `${JSON.stringify({ status: report.health.status, reasons: report.health.reasons, consul: report.consul, routes: report.routes.length })}\n`);
      case '/v1/routes':
        return send(200, 'application/json', `${JSON.stringify(report, null, 2)}\n`);
      case '/metrics':
        return send(200, this.metrics.contentType, await this.metrics.text(report));
      case '/': {
        // A browser (Accept prefers text/html) gets the status page; curl's */* the plain text.
        res.setHeader('vary', 'accept');
        if (prefersHtml(req.headers.accept)) {
          for (const [name, value] of Object.entries(statusPageHeaders)) res.setHeader(name, value);
          return send(200, 'text/html; charset=utf-8', statusPage(report, Date.now()));
        }
        const lines = report.routes.map((r) => `${r.fqdn}  ${r.address}:${r.port}  ${r.healthyBackends} backend(s)  ${r.listening ? 'listening' : 'NOT listening'}`);
        return send(200, 'text/plain; charset=utf-8', `loopmesh on ${report.node}: ${consulLine(report.consul)}\n\n${lines.join('\n')}\n${report.problems.map((p) => `\nproblem ${p.code}: ${p.message}`).join('')}\n`);
      }
      default:
        return send(404, 'text/plain', `no such path ${path}; expected /health, /health/live, /v1/routes, /metrics or /\n`);
    }
  }
}
