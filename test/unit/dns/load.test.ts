import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import type { ServiceSpec } from '../../../agent/contract/balancer-config.js';
import { DnsServer } from '../../../agent/dns/server.js';
import { silentLogger } from '../../../agent/log.js';
import { dig } from '../../support/resolve.js';

/**
 * A smoke version of the DNS benchmark (npm run bench:dns): one second of dnsperf at a modest capped
 * rate, A, SRV and missing names mixed, with and without EDNS. Every query is answered (none lost),
 * with the right code, and the answers are still right afterwards. Speed is the benchmark's business.
 */

const names = 50;
const services: ServiceSpec[] = Array.from({ length: names }, (_, i) => ({ service: `s${i}`, name: `s${i}`, fqdn: `s${i}.local`, address: `127.91.0.${i + 1}`, port: 8000 + i, policy: 'round-robin', empty: 'reject', backends: [] }));

const hasDnsperf = (await execa('sh', ['-c', 'command -v dnsperf'], { reject: false })).exitCode === 0;

test('under a second of dnsperf load every query is answered, with the right code, and the answers stay right', { skip: hasDnsperf ? false : 'dnsperf is not installed (apt-get install dnsperf)', timeout: 60_000 }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-dns-load-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const server = new DnsServer({ host: '127.0.0.1', port: 0, logger: silentLogger(), suffix: 'local' });
  t.after(() => server.close());
  await server.start();
  server.setServices(services);
  const port = server.address()!.port;

  const lines: string[] = [];
  for (let i = 0; i < names; i++) lines.push(`s${i}.local A`, `_s${i}._tcp.local SRV`, `S${i}.Local A`);
  lines.push('missing.local A', 'nope.local SRV');
  const file = join(dir, 'queries.txt');
  await writeFile(file, `${lines.join('\n')}\n`);

  for (const edns of [[], ['-e']]) {
    const before = server.stats();
    const r = await execa('dnsperf', ['-s', '127.0.0.1', '-p', String(port), '-d', file, '-l', '1', '-Q', '3000', '-c', '2', '-t', '2', ...edns], { reject: false, timeout: 20_000 });
    assert.equal(r.exitCode, 0, r.stderr);
    const sent = Number(/Queries sent:\s+(\d+)/.exec(r.stdout)?.[1]);
    const completed = Number(/Queries completed:\s+(\d+)/.exec(r.stdout)?.[1]);
    const lost = Number(/Queries lost:\s+(\d+)/.exec(r.stdout)?.[1]);
    assert.ok(sent >= 500, `dnsperf sent a second's worth of queries (${sent}) with ${edns.join('') || 'no EDNS'}`);
    assert.equal(lost, 0, `no query lost: ${r.stdout}`);
    assert.equal(completed, sent);
    const codes = /Response codes:\s+(.*)/.exec(r.stdout)?.[1] ?? '';
    const count = (code: string): number => Number(new RegExp(`${code} (\\d+)`).exec(codes)?.[1] ?? 0);
    // The query file is read in order, round and round: NXDOMAIN for 2 lines in every len(lines).
    assert.equal(count('NOERROR') + count('NXDOMAIN'), completed, `only NOERROR and NXDOMAIN: ${codes}`);
    assert.ok(Math.abs(count('NXDOMAIN') - (completed * 2) / lines.length) <= 2, `NXDOMAIN for the missing names only: ${codes}`);
    const after = server.stats();
    assert.equal(after.queries - before.queries, sent, 'the server saw every query');
    assert.equal(after.answered - before.answered, count('NOERROR'));
    assert.equal(after.nxdomain - before.nxdomain, count('NXDOMAIN'));
    assert.equal(after.dropped, 0);
    assert.equal(after.formerr, 0);
  }

  for (const i of [0, 17, names - 1]) {
    assert.deepEqual((await dig({ host: '127.0.0.1', port }, `s${i}.local`)).answers, [`127.91.0.${i + 1}`]);
    assert.deepEqual((await dig({ host: '127.0.0.1', port }, `_s${i}._tcp.local`, 'SRV')).answers, [`0 1 ${8000 + i} s${i}.local.`]);
  }
});
