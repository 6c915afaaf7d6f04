import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { Retry } from '../../agent/retry.js';

test('Retry: one run per failure burst, pauses growing until a success, none after stop', async () => {
  const runs: number[] = [];
  const start = Date.now();
  const retry = new Retry(() => runs.push(Date.now() - start), { baseMs: 20, maxMs: 1000, random: () => 1 });
  retry.failed();
  retry.failed(); // already waiting: no second timer
  assert.equal(retry.pending, true);
  await sleep(60);
  assert.equal(runs.length, 1, 'the second failure of the burst did not add a run');
  assert.ok(runs[0]! >= 18, `first pause ~20 ms, got ${runs[0]}`);
  retry.failed();
  await sleep(70);
  assert.equal(runs.length, 2);
  assert.ok(runs[1]! - runs[0]! >= 38, `second pause doubled (~40 ms), got ${runs[1]! - runs[0]!}`);
  retry.succeeded();
  retry.failed();
  const before = Date.now() - start;
  await sleep(60);
  assert.equal(runs.length, 3);
  assert.ok(runs[2]! - before < 40, 'after a success the pause starts over');
  retry.failed();
  retry.stop();
  await sleep(60);
  assert.equal(runs.length, 3, 'nothing runs after stop');
  assert.equal(retry.pending, false);
});
