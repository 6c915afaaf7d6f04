import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { execa } from 'execa';

const root = join(import.meta.dirname, '..', '..');
const caseNames = ['keepalive-50', 'keepalive-1', 'close-50', 'close-1', '1mb-10'];
const proxies = ['loopmesh', 'haproxy'];

interface TargetResult {
  throughput: number;
  rps: number;
  mbps: number;
  p50Ms: number;
  p99Ms: number;
  cpuUsPerRequest: number | null;
  rssMb: number | null;
  errors: number;
}

interface BenchJson {
  rounds: number;
  scaling: { workers: number; available: boolean };
  cases: Array<{ name: string; unit: string; targets: Record<string, TargetResult>; ratios: Record<string, number> }>;
}

/** Equal within float rounding: the ratio must be the quotient of the figures printed beside it. */
function close(actual: number, expected: number, what: string): void {
  assert.ok(Number.isFinite(actual) && Math.abs(actual - expected) <= 1e-9 * Math.max(1, Math.abs(expected)), `${what}: ${actual}, expected ${expected}`);
}

test('the benchmark runs end to end in a tiny run: every case, three targets, ratios from the figures', { timeout: 240_000 }, async (t) => {
  for (const cmd of ['wrk', 'nginx', 'haproxy']) {
    const which = await execa('sh', ['-c', `command -v ${cmd} || test -x /usr/sbin/${cmd}`], { reject: false });
    if (which.exitCode !== 0) return t.skip(`${cmd} is not installed (Debian packages wrk, nginx-light, haproxy; npm test installs them)`);
  }
  const run = await execa('node', ['--import', 'tsx', join(root, 'test', 'bench', 'bench.ts'), '--json', '--no-convergence'], {
    cwd: root,
    env: { BENCH_SECONDS: '1', BENCH_ROUNDS: '1', BENCH_CLI: 'tsx' },
    reject: false,
    timeout: 200_000,
    all: false,
  });
  assert.equal(run.exitCode, 0, `bench exited ${run.exitCode}: ${run.stderr.slice(-3000)}`);
  const result = JSON.parse(run.stdout) as BenchJson;
  assert.equal(result.rounds, 1);
  assert.deepEqual(result.cases.map((c) => c.name), caseNames);
  for (const c of result.cases) {
    for (const name of ['direct', ...proxies]) {
      const x = c.targets[name];
      assert.ok(x, `${c.name}: no result for ${name}`);
      for (const key of ['throughput', 'rps', 'mbps', 'p50Ms', 'p99Ms'] as const) assert.ok(x[key] > 0, `${c.name}/${name}.${key} = ${x[key]}`);
      assert.equal(x.throughput, c.unit === 'MB/s' ? x.mbps : x.rps, `${c.name}/${name}: throughput in ${c.unit}`);
      if (name === 'direct') assert.equal(x.cpuUsPerRequest, null);
      else {
        assert.ok((x.cpuUsPerRequest ?? 0) > 0, `${c.name}/${name}.cpuUsPerRequest = ${x.cpuUsPerRequest}`);
        assert.ok((x.rssMb ?? 0) > 0, `${c.name}/${name}.rssMb = ${x.rssMb}`);
      }
      // Bytes through loopmesh arrive as HTTP answers wrk accepts: no socket errors, no non-2xx.
      assert.equal(x.errors, 0, `${c.name}/${name}: ${x.errors} errors`);
    }
    const lm = c.targets.loopmesh!;
    const hp = c.targets.haproxy!;
    const direct = c.targets.direct!;
    close(c.ratios.loopmeshVsHaproxy!, lm.throughput / hp.throughput, `${c.name} loopmesh/HAProxy`);
    close(c.ratios.loopmeshVsDirect!, lm.throughput / direct.throughput, `${c.name} loopmesh/direct`);
    close(c.ratios.haproxyVsDirect!, hp.throughput / direct.throughput, `${c.name} HAProxy/direct`);
    close(c.ratios.p99LoopmeshVsHaproxy!, lm.p99Ms / hp.p99Ms, `${c.name} p99 loopmesh/HAProxy`);
    if (result.scaling.available) {
      const w = c.targets[`loopmesh-w${result.scaling.workers}`];
      assert.ok(w && w.throughput > 0, `${c.name}: no figure for --workers ${result.scaling.workers}`);
      close(c.ratios[`workers${result.scaling.workers}VsOneWorker`]!, w.throughput / lm.throughput, `${c.name} workers/one`);
    }
  }
});
