import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseBalancerConfig, type ServicesBlock } from '../../../agent/contract/balancer-config.js';
import { BalancerError } from '../../../agent/errors.js';
import type { Route } from '../../../agent/plan/plan.js';
import { builtinTemplatesDir, compileTemplate } from '../../../agent/render/templates.js';

// The renderer hands the parser the routes block it rendered, so only changed services are parsed
// again. Whatever the block says, the result must be the whole text's: the same services, or the
// same error.

function route(i: number, backends = 2, over: Partial<Route> = {}): Route {
  return {
    service: `svc${i}`, name: `svc${i}`, fqdn: `svc${i}.local`, address: `127.77.0.${i + 1}`, port: 80, policy: 'round-robin', empty: 'reject', split: [], limits: {}, outlier: {}, gateways: [],
    backends: Array.from({ length: backends }, (_, k) => ({ id: `n${k}/svc${i}`, address: `10.0.${i}.${k}`, port: 8000 + k, weight: 1, subset: '' })),
    ...over,
  };
}

const builtin = async () => compileTemplate('balancer.json.hbs', await readFile(join(builtinTemplatesDir(), 'balancer.json.hbs'), 'utf8'), 'balancer.json');

test('parsed by parts: the same config as the whole text, unchanged services keep their objects, a changed one is new', async () => {
  const template = await builtin();
  let routes = Array.from({ length: 30 }, (_, i) => route(i));
  const text1 = template.render({ routes, suffix: 'local' });
  const blocks1 = template.lastBlocks();
  assert.equal(blocks1.length, 1);
  assert.equal(blocks1[0]?.parts.length, 30);
  const first = parseBalancerConfig(text1, 'b.json', {}, blocks1);
  assert.deepEqual(first, parseBalancerConfig(text1, 'b.json'));
  routes = routes.map((r, i) => (i === 7 ? route(7, 3) : r));
  const text2 = template.render({ routes, suffix: 'local' });
  const second = parseBalancerConfig(text2, 'b.json', {}, template.lastBlocks());
  assert.deepEqual(second, parseBalancerConfig(text2, 'b.json'), 'equal to a whole parse');
  assert.equal(second.services[7]?.backends.length, 3);
  assert.notEqual(second.services[7], first.services[7], 'the changed service is parsed anew');
  assert.equal(second.services[6], first.services[6], 'an unchanged one keeps its object');
  assert.equal(second.services[29], first.services[29]);
});

test('a block that does not fit the text gives what the whole text gives: the same services or the same error', async () => {
  const template = await builtin();
  const good = template.render({ routes: [route(0), route(1)], suffix: 'local' });
  const goodBlock = template.lastBlocks()[0] as ServicesBlock;
  const outcome = (text: string, blocks: readonly ServicesBlock[] = []): string => {
    try {
      return `loaded ${JSON.stringify(parseBalancerConfig(text, 'b.json', {}, blocks))}`;
    } catch (err) {
      assert.ok(err instanceof BalancerError);
      return err.message;
    }
  };
  const cases: Array<{ what: string; text: string; block: ServicesBlock }> = [
    // Two elements in one part: the whole text would have them both.
    { what: 'two elements in a part', text: `{"version":1,"services":[${goodBlock.out}]}`, block: { out: goodBlock.out, parts: [goodBlock.out] } },
    { what: 'a part with no comma before the next', text: `{"version":1,"services":[{"a":1} {"b":2}]}`, block: { out: '{"a":1} {"b":2}', parts: ['{"a":1} ', '{"b":2}'] } },
    { what: 'a bad service in a part', text: template.render({ routes: [route(0), route(1, 1, { address: '0.0.0.0' })], suffix: 'local' }), block: template.lastBlocks()[0] as ServicesBlock },
    { what: 'two services on one address', text: template.render({ routes: [route(0), route(1, 1, { address: '127.77.0.1' })], suffix: 'local' }), block: template.lastBlocks()[0] as ServicesBlock },
    { what: 'a non-JSON space after the comma', text: `{"version":1,"services":[${goodBlock.parts[0]}\u00a0${goodBlock.parts[1]}]}`, block: { out: `${goodBlock.parts[0]}\u00a0${goodBlock.parts[1]}`, parts: [`${goodBlock.parts[0]}\u00a0`, goodBlock.parts[1] ?? ''] } },
    { what: 'version 2 around good parts', text: good.replace('"version": 1', '"version": 2'), block: goodBlock },
  ];
  for (const c of cases) {
    assert.equal(outcome(c.text, [c.block]), outcome(c.text), c.what);
  }
  // The block somewhere else than the services' elements: the whole text's services (none).
  const elsewhere = `{"version":1,"services":[],"other":[${goodBlock.out}]}`;
  assert.equal(outcome(elsewhere, [goodBlock]), 'loaded {"version":1,"services":[]}');
  const wrapped = `{"version":1,"services":[[${goodBlock.out}]]}`;
  assert.equal(outcome(wrapped, [goodBlock]), outcome(wrapped), 'the block one level down');
  assert.match(outcome(cases[2]?.text ?? ''), /expected a loopback address/, 'a bad service is refused, with its message');
  // A block that is not in the text at all changes nothing either.
  assert.deepEqual(parseBalancerConfig(good, 'b.json', {}, [{ out: 'not there', parts: ['not there'] }]), parseBalancerConfig(good, 'b.json'));
});
