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
  assert.equal(template.lastBlocks().length, 1);
  const goodBlock = template.lastBlocks()[0] as ServicesBlock;
  const outcome = (text: string, blocks: readonly ServicesBlock[] = []): string => {
    try {
      return `loaded ${JSON.stringify(parseBalancerConfig(text, 'b.json', {}, blocks))}`;
    } catch (err) {
      assert.ok(err instanceof BalancerError);
      return err.message;
    }
  };
  const p0 = goodBlock.parts[0] ?? '';
  const p1 = goodBlock.parts[1] ?? '';
  const around = (prefix: string, parts: string[], suffix: string): { text: string; block: ServicesBlock } => ({ text: prefix + parts.join('') + suffix, block: { prefix, suffix, parts } });
  const rendered = (routes: Route[]): { text: string; block: ServicesBlock } => ({ text: template.render({ routes, suffix: 'local' }), block: template.lastBlocks()[0] as ServicesBlock });
  const cases: Array<{ what: string; text: string; block: ServicesBlock }> = [
    // Two elements in one part: the whole text would have them both.
    { what: 'two elements in a part', ...around('{"version":1,"services":[', [p0 + p1], ']}') },
    { what: 'a part with no comma before the next', ...around('{"version":1,"services":[', ['{"a":1} ', '{"b":2}'], ']}') },
    { what: 'a bad service in a part', ...rendered([route(0), route(1, 1, { address: '0.0.0.0' })]) },
    { what: 'two services on one address', ...rendered([route(0), route(1, 1, { address: '127.77.0.1' })]) },
    { what: 'a non-JSON space after the comma', ...around('{"version":1,"services":[', [`${p0}\u00a0`, p1], ']}') },
    { what: 'version 2 around good parts', ...around(goodBlock.prefix.replace('"version": 1', '"version": 2'), [p0, p1], goodBlock.suffix) },
    // The block somewhere else than the services' elements.
    { what: 'the block in another key', ...around('{"version":1,"services":[],"other":[', [p0, p1], ']}') },
    { what: 'the block one level down', ...around('{"version":1,"services":[[', [p0, p1], ']]}') },
    // A caller whose block does not add up to the text: the text is what counts.
    { what: 'a block that is not the text', text: good, block: { prefix: '{"version":1,"services":[', suffix: ']}', parts: ['{"x":1}'] } },
  ];
  for (const c of cases) {
    assert.equal(outcome(c.text, [c.block]), outcome(c.text), c.what);
  }
  assert.match(outcome(cases[2]?.text ?? ''), /expected a loopback address/, 'a bad service is refused, with its message');
  assert.match(outcome(cases[5]?.text ?? ''), /version: expected 1, got 2/);
  assert.equal(outcome(cases[6]?.text ?? ''), 'loaded {"version":1,"services":[]}', 'elsewhere: the whole text has no services');
});
