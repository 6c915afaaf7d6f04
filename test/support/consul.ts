import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { request as httpsRequest } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { freePort } from './net.js';

let binary: Promise<string> | undefined;

/** The real consul binary: $CONSUL_BIN, else whatever scripts/install-consul.sh provides. */
export function consulBinary(): Promise<string> {
  binary ??= process.env.CONSUL_BIN
    ? Promise.resolve(process.env.CONSUL_BIN)
    : execa('bash', [join(import.meta.dirname, '..', '..', 'scripts', 'install-consul.sh')]).then((r) => r.stdout.trim().split('\n').pop() ?? '');
  return binary;
}

export interface ServiceRegistration {
  id: string;
  name: string;
  port: number;
  address?: string;
  meta?: Record<string, string>;
  tags?: string[];
  /** A TTL check starts critical until passed; `passing: true` passes it right away. */
  ttlCheck?: { passing: boolean };
}

export interface TestConsulOptions {
  /** More HCL for the dev agent, e.g. acl { enabled = true ... }. */
  hcl?: string;
  /** Sent as X-Consul-Token by api() (for ACLs with default_policy deny). */
  token?: string;
  /** HTTPS only (http = -1) with verify_incoming; certificates made by `consul tls` in the data dir. */
  tls?: boolean;
}

/** The PEM files `consul tls ca create` / `consul tls cert create` made for a TLS TestConsul. */
export interface TestConsulCerts {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

/** A real Consul agent in dev mode (a one-node server) on free loopback ports. */
export class TestConsul {
  private process: ResultPromise | undefined;
  private dataDir = '';
  url = '';
  httpPort = 0;
  private ports: Record<string, number> = {};
  private options: TestConsulOptions = {};
  /** Set with `tls: true`. */
  certs: TestConsulCerts | undefined;

  static async start(options: TestConsulOptions = {}): Promise<TestConsul> {
    const c = new TestConsul();
    c.options = options;
    c.httpPort = await freePort();
    c.ports = { serf_lan: await freePort(), serf_wan: await freePort(), server: await freePort() };
    c.url = `${options.tls ? 'https' : 'http'}://127.0.0.1:${c.httpPort}`;
    c.dataDir = await mkdtemp(join(tmpdir(), 'loopmesh-consul-'));
    if (options.tls) c.certs = await makeCerts(join(c.dataDir, 'tls'));
    await c.run();
    return c;
  }

  private async run(): Promise<void> {
    const bin = await consulBinary();
    const http = this.certs ? `http = -1, https = ${this.httpPort}` : `http = ${this.httpPort}`;
    const ports = `ports { ${http}, dns = -1, grpc = -1, grpc_tls = -1, serf_lan = ${this.ports.serf_lan}, serf_wan = ${this.ports.serf_wan}, server = ${this.ports.server} }`;
    this.process = execa(bin, ['agent', '-dev', '-bind=127.0.0.1', '-client=127.0.0.1', `-node=loopmesh-test-${this.httpPort}`, '-log-level=warn', `-hcl=${ports}`, ...this.extraHcl()], {
      reject: false,
      stdio: 'ignore',
      cleanup: true,
    });
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      try {
        const res = await this.send('GET', '/v1/status/leader', undefined, 1000);
        if (res.status === 200 && res.text.length > 4) return;
      } catch {
        // not up yet
      }
      if (this.process.exitCode !== null) throw new Error(`consul exited with ${this.process.exitCode} before it was ready`);
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`consul did not elect a leader at ${this.url} within 30 s`);
  }

  private extraHcl(): string[] {
    const out: string[] = [];
    const c = this.certs;
    if (c) out.push(`-hcl=tls { defaults { ca_file = "${c.ca}", cert_file = "${c.serverCert}", key_file = "${c.serverKey}", verify_incoming = true } }`);
    if (this.options.hcl) out.push(`-hcl=${this.options.hcl}`);
    return out;
  }

  /** One request to the agent's HTTP API: over TLS with the client certificate when `tls` is on. */
  private async send(method: string, path: string, body: string | undefined, timeoutMs: number): Promise<{ status: number; text: string }> {
    const headers: Record<string, string> = this.options.token ? { 'x-consul-token': this.options.token } : {};
    const c = this.certs;
    if (!c) {
      const res = await fetch(`${this.url}${path}`, { method, body, headers, signal: AbortSignal.timeout(timeoutMs) });
      return { status: res.status, text: await res.text() };
    }
    const [ca, cert, key] = await Promise.all([readFile(c.ca, 'utf8'), readFile(c.clientCert, 'utf8'), readFile(c.clientKey, 'utf8')]);
    return new Promise((resolve, reject) => {
      const req = httpsRequest(`${this.url}${path}`, { method, headers, ca, cert, key, timeout: timeoutMs }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      });
      req.on('timeout', () => req.destroy(new Error(`${method} ${path}: no answer within ${timeoutMs} ms`)));
      req.on('error', reject);
      req.end(body);
    });
  }

  async api(method: string, path: string, body?: unknown): Promise<unknown> {
    const res = await this.send(method, path, body === undefined ? undefined : JSON.stringify(body), 10_000);
    if (res.status < 200 || res.status > 299) throw new Error(`${method} ${path}: HTTP ${res.status} ${res.text}`);
    return res.text ? JSON.parse(res.text) : undefined;
  }

  async register(s: ServiceRegistration): Promise<void> {
    await this.api('PUT', '/v1/agent/service/register', {
      ID: s.id,
      Name: s.name,
      Address: s.address ?? '127.0.0.1',
      Port: s.port,
      Meta: s.meta,
      Tags: s.tags,
      ...(s.ttlCheck ? { Check: { CheckID: `check-${s.id}`, TTL: '300s', Status: s.ttlCheck.passing ? 'passing' : 'critical' } } : {}),
    });
  }

  async deregister(id: string): Promise<void> {
    await this.api('PUT', `/v1/agent/service/deregister/${encodeURIComponent(id)}`);
  }

  async setCheck(serviceId: string, status: 'pass' | 'warn' | 'fail'): Promise<void> {
    await this.api('PUT', `/v1/agent/check/${status}/check-${encodeURIComponent(serviceId)}`);
  }

  /** Stops the agent (SIGTERM, then SIGKILL after 5 s). */
  async stop(): Promise<void> {
    const p = this.process;
    this.process = undefined;
    if (!p || p.exitCode !== null) return;
    // A test may have frozen it (SIGSTOP): a stopped process would hold SIGTERM until the forced kill.
    p.kill('SIGCONT');
    p.kill('SIGTERM'); // execa sends SIGKILL after its forceKillAfterDelay (5 s)
    await p;
  }

  /** Sends a signal to the running agent: SIGSTOP freezes it (its sockets stay open, nothing answers), SIGCONT resumes it. */
  signal(sig: NodeJS.Signals): void {
    const p = this.process;
    if (!p || p.exitCode !== null) throw new Error(`consul at ${this.url} is not running; cannot send ${sig}`);
    p.kill(sig);
  }

  /** SIGKILL: gone at once, nothing shut down cleanly; restart() brings up a new, empty one. */
  async kill(): Promise<void> {
    const p = this.process;
    this.process = undefined;
    if (!p || p.exitCode !== null) return;
    p.kill('SIGKILL');
    await p;
  }

  /** A new dev agent on the same ports: an empty catalog, like a cluster rebuilt from scratch. */
  async restart(): Promise<void> {
    await this.stop();
    await this.run();
  }

  async close(): Promise<void> {
    await this.stop();
    await rm(this.dataDir, { recursive: true, force: true });
  }
}

/** A CA, a server certificate for dc1 (server.dc1.consul, localhost, 127.0.0.1) and a client one, by Consul's own CLI. */
export async function makeCerts(dir: string): Promise<TestConsulCerts> {
  const bin = await consulBinary();
  await mkdir(dir, { recursive: true });
  for (const args of [['tls', 'ca', 'create'], ['tls', 'cert', 'create', '-server', '-dc', 'dc1'], ['tls', 'cert', 'create', '-client', '-dc', 'dc1']]) {
    await execa(bin, args, { cwd: dir });
  }
  return {
    ca: join(dir, 'consul-agent-ca.pem'),
    serverCert: join(dir, 'dc1-server-consul-0.pem'),
    serverKey: join(dir, 'dc1-server-consul-0-key.pem'),
    clientCert: join(dir, 'dc1-client-consul-0.pem'),
    clientKey: join(dir, 'dc1-client-consul-0-key.pem'),
  };
}
