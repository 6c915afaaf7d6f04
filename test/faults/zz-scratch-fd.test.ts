import { test } from 'node:test';
import { connect, type Socket } from 'node:net';
import { mkdtemp, writeFile, readdir, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { TestConsul } from '../support/consul.js';
import { freePort, startIdServer, whoAnswers } from '../support/net.js';
import { dig } from '../support/resolve.js';
import { hostsPrelude } from '../support/agent.js';
const LIMIT = Number(process.env.LIMIT ?? 256);
const COUNT = Number(process.env.COUNT ?? 300);
async function cpuTicks(pid: number): Promise<number> { const f = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' '); return Number(f[11]) + Number(f[12]); }
test('fd explore', async (t) => {
  const consul = await TestConsul.start();
  const s = await startIdServer('backend');
  const port = await freePort();
  await consul.register({ id: 'web-1', name: 'web', port: s.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
  const dir = await mkdtemp(join(tmpdir(), 'lm-fd-'));
  await writeFile(join(dir, 'hosts'), hostsPrelude);
  const admin = `127.0.0.1:${await freePort()}`;
  const dnsPort = await freePort();
  const child = execa('prlimit', [`--nofile=${LIMIT}:${LIMIT}`, 'node', '--import', 'tsx', 'agent/cli/main.ts', 'agent', '--consul', consul.url, '--run-dir', join(dir, 'run'), '--hosts-file', join(dir, 'hosts'), '--dns', `127.0.0.1:${dnsPort}`, '--admin', admin, '--range', '127.78.0.0/16', '--log-level', 'debug'], { reject: false, cleanup: true, stdio: ['ignore', 'pipe', 'pipe'], env: { LOOPMESH_LOG_FORMAT: 'json' } });
  let address = '';
  for (let i = 0; i < 100; i++) { try { const r = await fetch(`http://${admin}/v1/routes`); const j = await r.json() as any; address = j.routes?.find((x: any) => x.service === 'web')?.address ?? ''; if (address && (await fetch(`http://${admin}/health`)).ok) break; } catch {} await sleep(100); }
  t.diagnostic(`address ${address}; idle fds ${(await readdir(`/proc/${child.pid}/fd`)).length}`);
  const states = new Map<string, number>(); const bump = (k: string) => states.set(k, (states.get(k) ?? 0) + 1);
  const sockets: Socket[] = [];
  const results: Promise<string>[] = [];
  for (let i = 0; i < COUNT; i++) {
    const sock = connect({ host: address, port });
    sockets.push(sock);
    results.push(new Promise((resolve) => {
      let got = false;
      sock.on('data', () => { if (!got) { got = true; resolve('greeted'); } });
      sock.on('error', (e: NodeJS.ErrnoException) => resolve(`error ${e.code}`));
      sock.on('close', () => resolve(got ? 'greeted' : 'closed before greeting'));
      setTimeout(() => resolve('pending'), 12000);
    }));
  }
  const c0 = await cpuTicks(child.pid!); const w0 = Date.now();
  await sleep(1000);
  await consul.register({ id: 'late-1', name: 'late', port: s.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
  await sleep(4000);
  try { const r = await fetch(`http://${admin}/v1/routes`, { signal: AbortSignal.timeout(2000) }); t.diagnostic(`routes during: ${(await r.text()).slice(0, 1500)}`); } catch (e) { t.diagnostic(`routes fetch failed ${(e as Error).message}`); }
  let h: string; try { const r = await fetch(`http://${admin}/health`, { signal: AbortSignal.timeout(2000) }); h = `${r.status} ${await r.text()}`; } catch (e) { h = `fetch failed: ${(e as Error).message} ${(e as any).cause?.code}`; }
  t.diagnostic(`health during: ${h.slice(0, 400)}`);
  let d = await dig({ host: '127.0.0.1', port: dnsPort }, 'web.local'); t.diagnostic(`dig during: ${JSON.stringify(d)}`);
  const c1 = await cpuTicks(child.pid!); t.diagnostic(`cpu during ${(c1 - c0) * 10} ms over ${Date.now() - w0} ms; fds now ${(await readdir(`/proc/${child.pid}/fd`)).length}; alive ${child.exitCode === null}`);
  for (const r of await Promise.all(results)) bump(r);
  t.diagnostic(JSON.stringify([...states]));
  // still states after 8s
  const stillOpen = sockets.filter((x) => !x.destroyed).length; t.diagnostic(`still open on client side: ${stillOpen}`);
  for (const x of sockets) x.destroy();
  const r0 = Date.now();
  for (let i = 0; i < 200; i++) { try { const r = await fetch(`http://${admin}/health`, { signal: AbortSignal.timeout(1000) }); if (r.ok) break; t.diagnostic(`health after: ${r.status} ${(await r.text()).slice(0, 300)}`); } catch (e) { } await sleep(100); }
  t.diagnostic(`health ok after ${Date.now() - r0} ms`);
  await sleep(3000);
  try { const r = await fetch(`http://${admin}/v1/routes`, { signal: AbortSignal.timeout(2000) }); t.diagnostic(`routes after: ${(await r.text()).slice(0, 1500)}`); } catch (e) { t.diagnostic(`routes fetch failed ${(e as Error).message}`); }
  try { t.diagnostic(`after: ${await whoAnswers(address, port)}`); } catch (e) { t.diagnostic(`after whoAnswers failed: ${(e as Error).message}`); }
  d = await dig({ host: '127.0.0.1', port: dnsPort }, 'web.local'); t.diagnostic(`dig after: ${JSON.stringify(d)}`);
  t.diagnostic(`fds after ${(await readdir(`/proc/${child.pid}/fd`)).length}; alive ${child.exitCode === null}`);
  child.kill('SIGTERM');
  const res = await child;
  const lines = String(res.stderr).split('\n').filter(Boolean);
  const by = new Map<string, number>(); for (const l of lines) { try { const j = JSON.parse(l); const k = `${j.level} ${j.msg} ${j.code ?? ''} ${j.err ?? ''}`.slice(0, 200); by.set(k, (by.get(k) ?? 0) + 1); } catch { by.set(l.slice(0, 200), (by.get(l.slice(0, 200)) ?? 0) + 1); } }
  t.diagnostic(`exit ${res.exitCode} ${res.signal}; ${lines.length} lines`);
  for (const [k, v] of [...by].sort((a, b) => b[1] - a[1]).slice(0, 30)) t.diagnostic(`${v} × ${k}`);
  await s.close(); await consul.close();
});
