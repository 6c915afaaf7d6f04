import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockingQuery, backoffDelay, nextIndex } from '../../../agent/consul/blocking-query.js';
import type { QueryResult } from '../../../agent/consul/client.js';
import { silentLogger } from '../../../agent/log.js';

test('nextIndex follows the blocking-query rules', () => {
  assert.deepEqual(nextIndex(undefined, 10n), { index: 10n, changed: true });
  assert.deepEqual(nextIndex(10n, 10n), { index: 10n, changed: false }, 'same index: ask again, no event');
  assert.deepEqual(nextIndex(10n, 12n), { index: 12n, changed: true });
  assert.deepEqual(nextIndex(10n, 3n), { index: 3n, changed: true }, 'backwards: reset to it');
  assert.deepEqual(nextIndex(undefined, 0n), { index: 1n, changed: true }, 'never index 0');
  assert.deepEqual(nextIndex(5n, 0n), { index: 1n, changed: true });
});

test('backoffDelay grows, is capped and jittered within [ceiling/2, ceiling]', () => {
  assert.equal(backoffDelay(1, 250, 30_000, () => 0), 125);
  assert.equal(backoffDelay(1, 250, 30_000, () => 1), 250);
  assert.equal(backoffDelay(3, 250, 30_000, () => 1), 1000);
  assert.equal(backoffDelay(40, 250, 30_000, () => 1), 30_000);
  assert.equal(backoffDelay(40, 250, 30_000, () => 0), 15_000);
});

/**
 * Runs a BlockingQuery over scripted answers (each an index and whether a leader is known, or an
 * error); resolves once they are used up, with what the loop sent and reported.
 */
async function runScripted(
  answers: Array<[bigint, boolean] | Error>,
  reject: (index: bigint) => boolean = () => false,
): Promise<{ sent: (bigint | undefined)[]; changes: bigint[]; errors: number; recovered: number; attempts: number[] }> {
  const sent: (bigint | undefined)[] = [];
  const changes: bigint[] = [];
  let errors = 0;
  let recovered = 0;
  const attempts: number[] = [];
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const q = new BlockingQuery({
    name: 'test',
    logger: silentLogger(),
    minIntervalMs: 1,
    backoffBaseMs: 1,
    backoffMaxMs: 5,
    fetch: async (index): Promise<QueryResult> => {
      sent.push(index);
      const a = answers.shift();
      if (a === undefined) {
        done();
        return new Promise(() => undefined);
      }
      if (a instanceof Error) throw a;
      return { body: null, index: a[0], knownLeader: a[1] };
    },
    onChange: (r) => {
      if (reject(r.index ?? -1n)) throw new Error(`wrong shape at ${r.index}`);
      changes.push(r.index ?? -1n);
    },
    onError: (_err, attempt) => {
      errors += 1;
      attempts.push(attempt);
    },
    onRecover: () => (recovered += 1),
  });
  q.start();
  await finished;
  await Promise.race([q.stop(), new Promise((r) => setTimeout(r, 100))]);
  return { sent, changes, errors, recovered, attempts };
}

test('the loop sends the last index, resets it after an error, reports changes only, and never gives up', async () => {
  const down = new Error('down');
  const { sent, changes, errors, recovered } = await runScripted([[5n, true], [5n, true], [7n, true], down, down, [7n, true], [3n, true]]);
  assert.deepEqual(sent, [undefined, 5n, 5n, 7n, undefined, undefined, 7n, 3n]);
  assert.deepEqual(changes, [5n, 7n, 7n, 3n], 'the read after an outage is reported; a repeat of the same index is not');
  assert.equal(errors, 2);
  assert.equal(recovered, 1);
});

test('an older answer from a server without a leader (replaying after a restart) is ignored; one with a leader resets', async () => {
  // 100 served; a leaderless server answers 43 (old snapshot): ignored; then 120 with a leader.
  // Later 50 with a leader (a cluster really rebuilt): taken.
  const { sent, changes } = await runScripted([[100n, true], [43n, false], [43n, false], [120n, true], [50n, true]]);
  assert.deepEqual(changes, [100n, 120n, 50n], 'the old snapshot never reaches onChange');
  assert.deepEqual(sent, [undefined, 100n, undefined, undefined, 120n, 50n], 'after an ignored answer, a plain read');
});

test('a rejected answer (onChange throws) is retried from a plain read with growing backoff, not blocked on its index', async () => {
  // 8 and 9 carry a wrong-shaped body: blocking on 8 would keep it in force until the next change.
  const { sent, changes, errors, recovered, attempts } = await runScripted([[5n, true], [8n, true], [8n, true], [9n, true], [9n, true], [9n, true]], (i) => i === 8n);
  assert.deepEqual(changes, [5n, 9n], 'the rejected answer never counts as accepted');
  assert.deepEqual(sent, [undefined, 5n, undefined, undefined, 9n, 9n, 9n], 'after each rejection a plain read, then blocking on the accepted index');
  assert.equal(errors, 2);
  assert.deepEqual(attempts, [1, 2], 'the backoff grows while the answers stay rejected');
  assert.equal(recovered, 0, 'Consul answered all along: not a recovery');
});
