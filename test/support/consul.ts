import { mkdtemp, rm } from 'node:fs/promises';
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

/** A real Consul agent in dev mode (a one-node server) on free loopback ports. */
export class TestConsul {
  private process: ResultPromise | undefined;
  private dataDir = '';
  url = '';
  httpPort = 0;
  private ports: Record<string, number> = {};

  static async start(): Promise<TestConsul> {
    const c = new TestConsul();
    c.httpPort = await freePort();
    c.ports = { serf_lan: await freePort(), serf_wan: await freePort(), server: await freePort() };
    c.url = `http://127.0.0.1:${c.httpPort}`;
    c.dataDir = await mkdtemp(join(tmpdir(), 'loopmesh-consul-'));
    await c.run();
    return c;
  }

  private async run(): Promise<void> {
    const bin = await consulBinary();
    const ports = `ports { http = ${this.httpPort}, dns = -1, grpc = -1, grpc_tls = -1, serf_lan = ${this.ports.serf_lan}, serf_wan = ${this.ports.serf_wan}, server = ${this.ports.server} }`;
    this.process = execa(bin, ['agent', '-dev', '-bind=127.0.0.1', '-client=127.0.0.1', `-node=loopmesh-test-${this.httpPort}`, '-log-level=warn', `-hcl=${ports}`], {
      reject: false,
      stdio: 'ignore',
      cleanup: true,
    });
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      try {
        const res = await fetch(`${this.url}/v1/status/leader`, { signal: AbortSignal.timeout(1000) });
        if (res.ok && (await res.text()).length > 4) return;
      } catch {
        // not up yet
      }
      if (this.process.exitCode !== null) throw new Error(`consul exited with ${this.process.exitCode} before it was ready`);
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`consul did not elect a leader at ${this.url} within 30 s`);
  }

  async api(method: string, path: string, body?: unknown): Promise<unknown> {
    const res = await fetch(`${this.url}${path}`, { method, body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(10_000) });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${text}`);
    return text ? JSON.parse(text) : undefined;
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
    p.kill('SIGTERM'); // execa sends SIGKILL after its forceKillAfterDelay (5 s)
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
