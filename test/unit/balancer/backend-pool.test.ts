import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Backend, BackendPool, defaultOutlier, type PoolSettings } from '../../../agent/balancer/backend-pool.js';
import type { BackendSpec, BalancePolicy, SubsetSpec } from '../../../agent/contract/balancer-config.js';

const spec = (id: string, weight = 1, subset = ''): BackendSpec => ({ id, address: '127.0.0.1', port: 1000 + id.charCodeAt(0), weight, subset });

function settings(extra: Partial<PoolSettings> = {}): PoolSettings {
  return { policy: 'round-robin', empty: 'reject', split: [], outlier: defaultOutlier, drain: 'keep', drainTimeoutMs: 30000, ...extra };
}

function pool(specs: BackendSpec[], extra: Partial<PoolSettings> = {}, random?: () => number): BackendPool {
  const p = new BackendPool(random);
  p.update(specs, settings(extra));
  return p;
}

/** N first picks; each connection is counted open on its backend while `hold` is true. */
function picks(p: BackendPool, n: number, now = 0, hold = false): string[] {
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const b = p.pick(new Set(), now);
    assert.ok(b, 'a backend');
    if (hold) b.activeConnections++;
    out.push(b.spec.id);
  }
  return out;
}

function counts(ids: string[]): Record<string, number> {
  return ids.reduce<Record<string, number>>((acc, id) => ({ ...acc, [id]: (acc[id] ?? 0) + 1 }), {});
}

function byId(p: BackendPool, id: string): Backend {
  const b = p.list().find((x) => x.spec.id === id);
  assert.ok(b, id);
  return b;
}

/** A seeded generator (mulberry32), so the p2c draws repeat. */
function seeded(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test('round-robin honours weights exactly (9:1 gives 9:1, smoothly interleaved)', () => {
  const p = pool([spec('a', 9), spec('b', 1)]);
  const got = picks(p, 100);
  assert.deepEqual(counts(got), { a: 90, b: 10 });
  // Smooth: b is not served in a burst; never two b in a row.
  assert.ok(!got.join(',').includes('b,b'));
});

for (const policy of ['least-conn', 'p2c-ewma'] as BalancePolicy[]) {
  test(`${policy} honours weights: with connections held open, a 3:1 pool ends up with about 3:1 open`, () => {
    const p = pool([spec('a', 3), spec('b', 1)], { policy }, seeded(7));
    const got = counts(picks(p, 400, 0, true));
    const share = (got.a ?? 0) / 400;
    assert.ok(share > 0.7 && share < 0.8, `a got ${got.a} of 400 (${share}); expected about 0.75`);
  });
}

test('least-conn sends the next connection to the backend with the fewest open; ties go round', () => {
  const p = pool([spec('a'), spec('b'), spec('c')], { policy: 'least-conn' });
  byId(p, 'a').activeConnections = 5;
  byId(p, 'b').activeConnections = 1;
  byId(p, 'c').activeConnections = 1;
  const got = picks(p, 2);
  assert.deepEqual([...got].sort(), ['b', 'c'], `ties between b and c alternate: ${got.join(',')}`);
  assert.equal(picks(p, 1)[0] === 'a', false);
});

test('p2c-ewma prefers the backend with the lower connect time, and still tries the slow one sometimes', () => {
  const p = pool([spec('fast'), spec('slow')], { policy: 'p2c-ewma' }, seeded(1));
  for (let i = 0; i < 5; i++) {
    p.connected(byId(p, 'fast'), 0.2);
    p.connected(byId(p, 'slow'), 50);
  }
  const got = counts(picks(p, 200));
  assert.ok((got.fast ?? 0) > 150, `fast got ${got.fast} of 200`);
  // Two draws from two backends can be the same one only if... they are distinct: so slow never wins against fast.
  assert.equal(got.slow ?? 0, 0, 'of two distinct backends the cheaper always wins');
});

test('p2c-ewma: a new backend is priced at the mean of the others, so it takes connections at once', () => {
  const p = pool([spec('a'), spec('b')], { policy: 'p2c-ewma' }, seeded(3));
  p.connected(byId(p, 'a'), 1);
  p.connected(byId(p, 'b'), 1);
  p.update([spec('a'), spec('b'), spec('c')], settings({ policy: 'p2c-ewma' }));
  const got = counts(picks(p, 300, 0, true));
  assert.ok((got.c ?? 0) > 60, `the new backend got ${got.c} of 300`);
});

test('weight 0 takes no new connections while another backend is there', () => {
  const p = pool([spec('a', 1), spec('zero', 0)]);
  assert.deepEqual(counts(picks(p, 20)), { a: 20 });
  // Nothing else left (a tried): better than no answer.
  assert.equal(p.pick(new Set([byId(p, 'a')]), 0)?.spec.id, 'zero');
});

test('policy state survives a reload: open connections, latencies and ejections stay with a backend that stays', () => {
  const p = pool([spec('a'), spec('b')]);
  const a = byId(p, 'a');
  a.activeConnections = 4;
  p.connected(a, 3);
  for (let i = 0; i < 3; i++) p.failed(a, 'connect', 2000, 1000);
  p.update([spec('a', 5), spec('b'), spec('c')], settings({ policy: 'least-conn' }));
  const after = byId(p, 'a');
  assert.equal(after, a, 'the same object');
  assert.deepEqual([after.activeConnections, after.weight, after.ejected(1001)], [4, 5, true]);
});

test('passive health: N failures in a row eject with a doubling back-off; a success ends the run', () => {
  const p = pool([spec('bad'), spec('good')]);
  const bad = byId(p, 'bad');
  const now = 1_000_000;
  for (let i = 0; i < defaultOutlier.consecutiveFailures - 1; i++) p.failed(bad, 'connect', 1, now);
  assert.equal(bad.ejected(now), false, 'not ejected below the threshold');
  p.failed(bad, 'timeout', 2000, now);
  assert.equal(bad.ejectedUntil, now + defaultOutlier.baseEjectionMs);
  assert.equal(bad.status(now).ejectReason, 'timeout');
  assert.deepEqual(picks(p, 6, now + 1), Array(6).fill('good'), 'skipped while ejected');
  assert.equal(p.pick(new Set([byId(p, 'good')]), now + 1), bad, 'when the healthy one was tried, the ejected one beats no answer');
  const later = now + defaultOutlier.baseEjectionMs + 1;
  p.failed(bad, 'connect', 1, later);
  assert.equal(bad.ejectedUntil, later + 2 * defaultOutlier.baseEjectionMs, 'a failed probe ejects for twice as long');
  p.succeeded(bad);
  assert.deepEqual([bad.ejected(later), bad.consecutiveFailures, bad.ejectionsInRow, bad.ejectionsTotal], [false, 0, 0, 2]);
});

test('passive health: resets before the first byte count like connect failures', () => {
  const p = pool([spec('a'), spec('b')]);
  const a = byId(p, 'a');
  for (let i = 0; i < 3; i++) p.failed(a, 'reset', 0, 10);
  assert.deepEqual([a.ejected(11), a.resetsBeforeFirstByte, a.failedConnects, a.status(11).ejectReason], [true, 3, 0, 'reset']);
});

test('passive health: at most maxEjectedPercent of the backends are ejected (at least one)', () => {
  const p = pool([spec('a'), spec('b'), spec('c'), spec('d')], { outlier: { ...defaultOutlier, maxEjectedPercent: 50 } });
  for (const id of ['a', 'b', 'c']) for (let i = 0; i < 3; i++) p.failed(byId(p, id), 'connect', 1, 10);
  assert.deepEqual(['a', 'b', 'c', 'd'].map((id) => byId(p, id).ejected(11)), [true, true, false, false], 'the third is not ejected: 2 of 4 is the cap');
  const two = pool([spec('a'), spec('b')], { outlier: { ...defaultOutlier, maxEjectedPercent: 0 } });
  for (let i = 0; i < 3; i++) two.failed(byId(two, 'a'), 'connect', 1, 10);
  assert.equal(byId(two, 'a').ejected(11), true, 'one may always be ejected');
});

test('passive health: below the panic threshold ejections are ignored and every backend is used', () => {
  const p = pool([spec('a'), spec('b'), spec('c'), spec('d')], { outlier: { ...defaultOutlier, maxEjectedPercent: 100, panicThresholdPercent: 50 } });
  for (const id of ['a', 'b']) for (let i = 0; i < 3; i++) p.failed(byId(p, id), 'connect', 1, 10);
  assert.equal(p.panic(11), false, '2 of 4 usable: at the threshold, not below');
  assert.deepEqual(new Set(picks(p, 4, 11)), new Set(['c', 'd']));
  for (let i = 0; i < 3; i++) p.failed(byId(p, 'c'), 'connect', 1, 10);
  assert.equal(p.panic(11), true, '1 of 4 usable');
  assert.deepEqual(new Set(picks(p, 8, 11)), new Set(['a', 'b', 'c', 'd']));
});

test('split: 20% of new connections to the canary subset, exactly, and the shares are counted', () => {
  const split: SubsetSpec[] = [{ name: 'canary', weight: 20 }, { name: '', weight: 80 }];
  const p = pool([spec('old1'), spec('old2'), spec('new', 1, 'canary')], { split });
  const got = picks(p, 100);
  for (const id of got) p.forwarded(byId(p, id));
  assert.deepEqual(counts(got), { old1: 40, old2: 40, new: 20 });
  assert.deepEqual(p.subsetStatus(), [{ name: 'canary', weight: 20, connections: 20 }, { name: '', weight: 80, connections: 80 }]);
});

test('split: weight 0 takes a subset out; a subset with no usable backend gives its share to the others', () => {
  const out = pool([spec('old'), spec('new', 1, 'canary')], { split: [{ name: 'canary', weight: 0 }, { name: '', weight: 100 }] });
  assert.deepEqual(counts(picks(out, 10)), { old: 10 });
  const all = pool([spec('old'), spec('new', 1, 'canary')], { split: [{ name: 'canary', weight: 100 }, { name: '', weight: 0 }] });
  assert.deepEqual(counts(picks(all, 10)), { new: 10 });
  const gone = pool([spec('old')], { split: [{ name: 'canary', weight: 50 }, { name: '', weight: 50 }] });
  assert.deepEqual(counts(picks(gone, 10)), { old: 10 }, 'no canary instance: everything to the rest');
  // A retry may leave the subset: the canary failed, the old one takes the connection.
  const retry = pool([spec('old'), spec('new', 1, 'canary')], { split: [{ name: 'canary', weight: 100 }, { name: '', weight: 0 }] });
  assert.equal(retry.pick(new Set([byId(retry, 'new')]), 0)?.spec.id, 'old');
});

test('drain policy: a removed backend keeps, drains until the deadline, or resets its open connections', async () => {
  for (const [drain, expectNow, expectLater] of [['keep', 0, 0], ['reset', 1, 1], ['drain', 0, 1]] as const) {
    const p = pool([spec('a'), spec('b')], { drain, drainTimeoutMs: 50 });
    let cut = 0;
    byId(p, 'a').connections.add({ cut: () => cut++ });
    p.update([spec('b')], settings({ drain, drainTimeoutMs: 50 }));
    assert.equal(cut, expectNow, `${drain}: at once`);
    await new Promise((r) => setTimeout(r, 80));
    assert.equal(cut, expectLater, `${drain}: after the deadline`);
  }
  // Back within the drain window (a health flap): the same backend, its connections not cut.
  const p = pool([spec('a'), spec('b')], { drain: 'drain', drainTimeoutMs: 50 });
  let cut = 0;
  const a = byId(p, 'a');
  a.connections.add({ cut: () => cut++ });
  p.update([spec('b')], settings({ drain: 'drain', drainTimeoutMs: 50 }));
  p.update([spec('a'), spec('b')], settings({ drain: 'drain', drainTimeoutMs: 50 }));
  await new Promise((r) => setTimeout(r, 80));
  assert.deepEqual([cut, byId(p, 'a') === a], [0, true]);
});

test('p2c-ewma: backends with about the same connect time share sequential connections evenly', () => {
  const p = pool([spec('a'), spec('b')], { policy: 'p2c-ewma' }, seeded(5));
  const got: string[] = [];
  for (let i = 0; i < 100; i++) {
    const b = p.pick(new Set(), 0);
    assert.ok(b);
    // What a forwarded connection records: its connect time (jittering around 0.1 ms) and the count.
    p.connected(b, 0.05 + ((i * 37) % 10) / 100);
    b.totalConnections++;
    got.push(b.spec.id);
  }
  const c = counts(got);
  assert.ok(Math.abs((c.a ?? 0) - (c.b ?? 0)) <= 2, `even: ${JSON.stringify(c)}`);
});

test('p2c-ewma: a backend that was slow once is tried again once its EWMA has decayed (tens of seconds)', () => {
  const p = pool([spec('hole'), spec('good')], { policy: 'p2c-ewma' }, seeded(9));
  p.failed(byId(p, 'hole'), 'timeout', 2000, 0);
  p.connected(byId(p, 'good'), 0.2, 0);
  assert.deepEqual(counts(picks(p, 20, 1000)), { good: 20 }, 'avoided right after');
  const later = picks(p, 20, 80_000);
  assert.ok(later.includes('hole'), `probed again after 80 s without samples: ${later.join(',')}`);
});

test('p2c-ewma: sequential connections follow the weights (9:1), also when the last connection has not closed yet', () => {
  const p = pool([spec('big', 9), spec('small', 1)], { policy: 'p2c-ewma' }, seeded(11));
  let lingering: Backend | undefined;
  const got: string[] = [];
  for (let i = 0; i < 100; i++) {
    const b = p.pick(new Set(), 0);
    assert.ok(b);
    // The previous connection is still counted open while this one is picked, as in a real run.
    if (lingering) lingering.activeConnections--;
    b.activeConnections++;
    b.totalConnections++;
    p.connected(b, 0.1, 0);
    lingering = b;
    got.push(b.spec.id);
  }
  assert.deepEqual(counts(got), { big: 90, small: 10 });
});

test('split: the shares count anew when the split changes, and go on when it stays', () => {
  const p = pool([spec('old'), spec('new', 1, 'canary')], { split: [{ name: 'canary', weight: 20 }, { name: '', weight: 80 }] });
  for (const id of picks(p, 10)) p.forwarded(byId(p, id));
  p.update([spec('old'), spec('new', 1, 'canary')], settings({ split: [{ name: 'canary', weight: 20 }, { name: '', weight: 80 }] }));
  assert.deepEqual(p.subsetStatus().map((s) => s.connections), [2, 8], 'same split: counting goes on');
  p.update([spec('old'), spec('new', 1, 'canary')], settings({ split: [{ name: 'canary', weight: 50 }, { name: '', weight: 50 }] }));
  assert.deepEqual(p.subsetStatus().map((s) => s.connections), [0, 0], 'a new split: counted anew');
});
