import { test } from 'node:test';
import assert from 'node:assert/strict';
import { getHeapStatistics } from 'node:v8';
import { IdleCollector } from '../../agent/idle-gc.js';
import { captureLogger } from '../support/log.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const collections = (lines: readonly { msg: string }[]): number => lines.filter((l) => l.msg === 'idle collection').length;

/** Garbage in the old generation: kept alive across scavenges, then dropped. */
async function oldGarbage(): Promise<number> {
  let junk: Array<{ i: number; s: string }> | undefined = Array.from({ length: 300_000 }, (_, i) => ({ i, s: `entry-${i}-${'x'.repeat(24)}` }));
  // Young-generation churn meanwhile promotes it.
  for (let round = 0; round < 5; round++) {
    Array.from({ length: 100_000 }, (_, i) => ({ i }));
    await sleep(5);
  }
  const size = junk.length;
  junk = undefined;
  return size;
}

test('idle collection: runs once the agent is quiet after a change on a large node, and gives the garbage back', async () => {
  const { logger, lines } = captureLogger('debug');
  const collector = new IdleCollector({ quietMs: 100, minRoutes: 500, logger });
  try {
    assert.equal(await oldGarbage(), 300_000);
    const before = getHeapStatistics().used_heap_size;
    collector.touched(2000);
    await sleep(400);
    assert.equal(collections(lines), 1, 'one collection after the quiet period');
    const after = getHeapStatistics().used_heap_size;
    assert.ok(after < before - 10 * 2 ** 20, `heap used ${Math.round(before / 2 ** 20)} MB -> ${Math.round(after / 2 ** 20)} MB: expected the 300,000 dropped entries to be collected`);
    const line = lines.find((l) => l.msg === 'idle collection') as { ms?: unknown; heapTotalMb?: { before?: unknown; after?: unknown } } | undefined;
    assert.equal(typeof line?.ms, 'number');
    assert.equal(typeof line?.heapTotalMb?.after, 'number');
    // At most once per quiet period: nothing more without a change.
    await sleep(300);
    assert.equal(collections(lines), 1);
  } finally {
    collector.stop();
  }
});

test('idle collection: not on a small node; each change restarts the quiet period; stop cancels it', async () => {
  const { logger, lines } = captureLogger('debug');
  const collector = new IdleCollector({ quietMs: 150, minRoutes: 500, logger });
  try {
    collector.touched(499);
    await sleep(400);
    assert.equal(collections(lines), 0, 'below minRoutes V8 is left alone');

    // Changes every 80 ms for 400 ms: no collection while they go on, one 150 ms after the last.
    const started = performance.now();
    for (let i = 0; i < 5; i++) {
      collector.touched(600);
      await sleep(80);
    }
    assert.equal(collections(lines), 0, 'no collection while changes keep coming');
    await sleep(300);
    assert.equal(collections(lines), 1);
    assert.ok(performance.now() - started >= 470);

    collector.touched(600);
    collector.stop();
    await sleep(400);
    assert.equal(collections(lines), 1, 'stopped before the quiet period ended: nothing ran');
  } finally {
    collector.stop();
  }
});
