import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import Handlebars from 'handlebars';
import { routesBlockUse } from '../../../agent/render/incremental.js';
import { builtinTemplatesDir, compileTemplate } from '../../../agent/render/templates.js';
import type { Route } from '../../../agent/plan/plan.js';

// A kept route's output must be exactly what a fresh render gives: checked against Handlebars with
// no cache, over a sequence of changes (insertions before others, removals, edits, the last route
// changing), for the built-in templates and for templates that read @index, @first, @last, block
// params and values outside the route.

function route(i: number, backends: number, port = 80): Route {
  return {
    service: `svc${i}`, name: `svc${i}`, fqdn: `svc${i}.local`, address: `127.77.0.${i + 1}`, port, policy: 'round-robin', empty: 'reject', split: [], limits: {}, outlier: {}, gateways: [],
    backends: Array.from({ length: backends }, (_, k) => ({ id: `n${k}/svc${i}`, address: `10.0.${i}.${k}`, port: 8000 + k, weight: 1, subset: '' })),
  };
}

const custom: Record<string, string> = {
  index: '{{#each routes}}{{@index}}:{{name}}{{#unless @last}},{{/unless}}\n{{/each}}',
  first: '{{#each routes}}{{#if @first}}FIRST {{/if}}{{name}} {{#each backends}}{{@index}}={{address}} {{/each}}\n{{/each}}',
  params: '{{#each routes as |r i|}}{{i}} {{r.name}}\n{{/each}}',
  outer: '{{#each routes}}{{name}}.{{../suffix}}\n{{/each}}',
  root: '{{#each routes}}{{name}} of {{@root.suffix}}\n{{/each}}',
  nestedOuter: '{{#each routes}}{{#each backends}}{{../name}}@{{@../index}} {{/each}}\n{{/each}}',
  empty: '{{#each routes}}{{name}}{{else}}no routes{{/each}}\n',
};

test('which templates keep route outputs, and which data they key on', async () => {
  const builtin = async (name: string) => routesBlockUse(Handlebars.parse(await readFile(join(builtinTemplatesDir(), name), 'utf8')));
  assert.deepEqual(await builtin('balancer.json.hbs'), { cacheable: true, index: false, first: false, last: true });
  assert.deepEqual(await builtin('haproxy.cfg.hbs'), { cacheable: true, index: false, first: false, last: false }, 'the servers\' @index is the nested loop\'s');
  assert.deepEqual(await builtin('hosts.hbs'), { cacheable: true, index: false, first: false, last: false });
  assert.equal(routesBlockUse(Handlebars.parse(custom.index ?? '')).index, true);
  assert.equal(routesBlockUse(Handlebars.parse(custom.params ?? '')).index, true);
  assert.equal(routesBlockUse(Handlebars.parse(custom.outer ?? '')).cacheable, false);
  assert.equal(routesBlockUse(Handlebars.parse(custom.root ?? '')).cacheable, false);
  assert.equal(routesBlockUse(Handlebars.parse(custom.nestedOuter ?? '')).index, true, '@../index in a nested loop is the routes loop\'s');
  assert.equal(routesBlockUse(Handlebars.parse('{{#each routes}}{{> part}}{{/each}}')).cacheable, false);
});

test('renders with kept outputs equal fresh renders through a sequence of changes', async () => {
  const sources: Record<string, string> = { ...custom };
  for (const name of ['balancer.json.hbs', 'haproxy.cfg.hbs', 'hosts.hbs']) sources[name] = await readFile(join(builtinTemplatesDir(), name), 'utf8');
  const kept = Object.fromEntries(Object.entries(sources).map(([name, source]) => [name, compileTemplate(name, source, name)]));
  const fresh = (source: string, routes: Route[]): string => Handlebars.create().compile(source, { noEscape: true, strict: true })({ routes, suffix: 'local' }, {
    helpers: { json: (v: unknown) => JSON.stringify(v), eq: (a: unknown, b: unknown) => a === b, min: (a: unknown, b: unknown) => Math.min(Number(a), Number(b)) },
  });
  let routes = Array.from({ length: 6 }, (_, i) => route(i + 10, 2));
  const steps: Array<[string, (r: Route[]) => Route[]]> = [
    ['as is', (r) => r],
    ['the same again', (r) => r.map((x) => ({ ...x }))],
    ['one backend more on the third', (r) => r.map((x, i) => (i === 2 ? route(12, 3) : x))],
    ['a route inserted first', (r) => [route(1, 1), ...r]],
    ['the last removed', (r) => r.slice(0, -1)],
    ['a route appended', (r) => [...r, route(40, 2)]],
    ['the first removed', (r) => r.slice(1)],
    ['a port changed', (r) => r.map((x, i) => (i === 1 ? { ...x, port: 9999 } : x))],
    ['none', () => []],
    ['back', () => [route(3, 1), route(4, 0)]],
  ];
  for (const [what, step] of steps) {
    routes = step(routes);
    for (const [name, template] of Object.entries(kept)) {
      assert.equal(template.render({ routes, suffix: 'local' }), fresh(sources[name] ?? '', routes), `${name} after "${what}"`);
    }
  }
});
