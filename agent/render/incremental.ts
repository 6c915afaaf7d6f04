import { randomBytes } from 'node:crypto';
import type Handlebars from 'handlebars';

type AstNode = hbs.AST.Node;

/** What the body of a `{{#each routes}}` block reads besides its route. */
export interface RoutesBlockUse {
  /** Only the route (and @first / @last / @index as noted): each route's output can be kept. */
  cacheable: boolean;
  index: boolean;
  first: boolean;
  last: boolean;
}

/**
 * Reads a template's syntax tree and says whether the body of its `{{#each routes}}` blocks depends
 * only on the route: no `../` or `@root` out of it, no partials (unknown bodies), and which of
 * @index / @first / @last it reads at its own level (a nested `{{#each}}` has its own).
 */
export function routesBlockUse(ast: hbs.AST.Program): RoutesBlockUse {
  const use: RoutesBlockUse = { cacheable: true, index: false, first: false, last: false };
  const isRoutesEach = (node: hbs.AST.BlockStatement): boolean => {
    const path = node.path as hbs.AST.PathExpression;
    const param = node.params[0] as hbs.AST.PathExpression | undefined;
    return path.type === 'PathExpression' && path.original === 'each' && param?.type === 'PathExpression' && !param.data && param.depth === 0 && param.original === 'routes';
  };

  /** ctx: context-changing blocks entered inside the routes block; frame: nested #each blocks entered. */
  const body = (node: AstNode | null | undefined, ctx: number, frame: number): void => {
    if (!node || !use.cacheable) return;
    switch (node.type) {
      case 'Program':
        for (const s of (node as hbs.AST.Program).body) body(s, ctx, frame);
        return;
      case 'PathExpression': {
        const p = node as hbs.AST.PathExpression;
        if (p.data) {
          if (p.parts[0] === 'root' || p.depth > frame) use.cacheable = false;
          else if (p.depth === frame) {
            const name = p.parts[0];
            if (name === 'index' || name === 'key') use.index = true;
            else if (name === 'first') use.first = true;
            else if (name === 'last') use.last = true;
          }
        } else if (p.depth > ctx) {
          use.cacheable = false;
        }
        return;
      }
      case 'MustacheStatement':
      case 'SubExpression': {
        const m = node as hbs.AST.MustacheStatement | hbs.AST.SubExpression;
        body(m.path, ctx, frame);
        for (const param of m.params) body(param, ctx, frame);
        for (const pair of m.hash?.pairs ?? []) body(pair.value, ctx, frame);
        return;
      }
      case 'BlockStatement': {
        const b = node as hbs.AST.BlockStatement;
        body(b.path, ctx, frame);
        for (const param of b.params) body(param, ctx, frame);
        for (const pair of b.hash?.pairs ?? []) body(pair.value, ctx, frame);
        const helper = (b.path as hbs.AST.PathExpression).original;
        const nested = helper === 'each' ? [ctx + 1, frame + 1] : helper === 'with' ? [ctx + 1, frame] : [ctx, frame];
        body(b.program, nested[0] ?? ctx, nested[1] ?? frame);
        body(b.inverse, ctx, frame);
        return;
      }
      case 'ContentStatement':
      case 'CommentStatement':
      case 'StringLiteral':
      case 'NumberLiteral':
      case 'BooleanLiteral':
      case 'UndefinedLiteral':
      case 'NullLiteral':
        return;
      default:
        // Partials and decorators: a body this cannot see.
        use.cacheable = false;
    }
  };

  const find = (node: AstNode | null | undefined): void => {
    if (!node) return;
    if (node.type === 'Program') for (const s of (node as hbs.AST.Program).body) find(s);
    else if (node.type === 'BlockStatement') {
      const b = node as hbs.AST.BlockStatement;
      if (isRoutesEach(b)) {
        if ((b.program.blockParams?.length ?? 0) >= 2) use.index = true;
        body(b.program, 0, 0);
      } else {
        find(b.program);
        find(b.inverse);
      }
    } else if (node.type === 'PartialStatement' || node.type === 'PartialBlockStatement' || node.type === 'DecoratorBlock') {
      use.cacheable = false;
    }
  };
  find(ast);
  return use;
}

/** A route's JSON, computed once per route object: the templates of one render share it. */
const fingerprints = new WeakMap<object, string>();

function fingerprint(item: unknown): string {
  if (typeof item !== 'object' || item === null) return JSON.stringify(item) ?? '';
  let text = fingerprints.get(item);
  if (text === undefined) {
    text = JSON.stringify(item);
    fingerprints.set(item, text);
  }
  return text;
}

interface Kept {
  /** What the block reads of @index / @first / @last for this output (see variantOf). */
  variant: number;
  text: string;
  /** The render that used it last: outputs no render used are dropped. */
  used: number;
}

/** A flat copy of a string built by concatenation (V8 keeps such a string as a tree of its pieces). */
function flatten(text: string): string {
  return text.length < 2 ? text : Buffer.from(text, 'utf8').toString('utf8');
}

interface HelperOptions {
  fn: ((context: unknown, options?: { data?: unknown; blockParams?: unknown[] }) => string) & { program?: number };
  inverse: (context: unknown) => string;
  data?: { root?: { routes?: unknown } };
}

/**
 * One `{{#each routes}}` block's output in a render: each route's part in order, their join, and the
 * marker the helper returned in its place (the template's caller puts `out` there; see templates.ts).
 */
export interface RoutesBlock {
  marker: string;
  out: string;
  parts: readonly string[];
}

/** Per process: a marker no template text or route can hold (NUL bytes and a random nonce). */
const markerNonce = randomBytes(12).toString('hex');

/** The routes blocks the last render of a template produced (see registerIncrementalEach). */
export interface BlockRecorder {
  blocks: RoutesBlock[];
}

/** Per block (program): the last render's routes and outputs by position, and every kept output by the route's JSON. */
interface ProgramCache {
  items: unknown[];
  kept: Kept[];
  byJson: Map<string, Kept>;
  render: number;
}

/**
 * An `each` for one compiled template that keeps each route's output between renders: a route whose
 * JSON is the same as last time (and whose @index / @first / @last, where the block reads them, are
 * too) is not rendered again. One change at 2,000 services re-renders one route, not 2,000. Any other
 * `each` (or a template whose routes block reads more than its route) is Handlebars' own. The
 * returned recorder holds the routes blocks of the last render (the caller empties it before one).
 */
export function registerIncrementalEach(hb: typeof Handlebars, use: RoutesBlockUse): BlockRecorder {
  const builtin = hb.helpers.each as (this: unknown, context: unknown, options: HelperOptions) => string;
  const recorder: BlockRecorder = { blocks: [] };
  const caches = new Map<number, ProgramCache>();
  /** The @index / @first / @last the block reads, as one number (0 when it reads none). */
  const variantOf = (i: number, n: number): number => (use.index ? (i + 1) * 4 : 0) + (use.first && i === 0 ? 2 : 0) + (use.last && i === n - 1 ? 1 : 0);
  hb.registerHelper('each', function (this: unknown, context: unknown, options: HelperOptions): string {
    const program = options.fn.program;
    if (!use.cacheable || !Array.isArray(context) || context !== options.data?.root?.routes || program === undefined || !options.data) {
      return builtin.call(this, context, options);
    }
    if (context.length === 0) return options.inverse(this);
    let cache = caches.get(program);
    if (!cache) {
      cache = { items: [], kept: [], byJson: new Map(), render: 0 };
      caches.set(program, cache);
    }
    const render = (cache.render += 1);
    const frame = hb.createFrame(options.data) as Record<string, unknown>;
    const n = context.length;
    const items: unknown[] = new Array<unknown>(n);
    const kept: Kept[] = new Array<Kept>(n);
    const parts: string[] = new Array<string>(n);
    for (let i = 0; i < n; i++) {
      const item: unknown = context[i];
      const variant = variantOf(i, n);
      // The same route object at the same place as last time (the plan keeps unchanged routes'
      // objects): its output, without computing or looking up its JSON.
      let k: Kept | undefined = cache.items[i] === item ? cache.kept[i] : undefined;
      if (k === undefined || k.variant !== variant) {
        // Keyed by the route's JSON itself (shared with the other templates, not copied).
        const json = fingerprint(item);
        k = cache.byJson.get(json);
        if (k === undefined || k.variant !== variant) {
          frame.key = i;
          frame.index = i;
          frame.first = i === 0;
          frame.last = i === n - 1;
          // Flat: Handlebars builds its output by concatenation, and a kept rope holds every piece.
          k = { variant, text: flatten(options.fn(item, { data: frame, blockParams: [item, i] })), used: render };
          // Two routes with the same JSON (never in a valid plan) keep the last one's variant only.
          cache.byJson.set(json, k);
        }
      }
      k.used = render;
      items[i] = item;
      kept[i] = k;
      parts[i] = k.text;
    }
    // What this render did not use goes, once it outnumbers what it used (no sweep per change).
    if (cache.byJson.size > 2 * n + 64) {
      for (const [json, k] of cache.byJson) if (k.used !== render) cache.byJson.delete(json);
    }
    cache.items = items;
    cache.kept = kept;
    const out = parts.join('');
    // In its place a marker: the caller puts `out` there, and so knows the text around it without
    // searching megabytes of output.
    const marker = `\u0000loopmesh-routes-${markerNonce}-${recorder.blocks.length}\u0000`;
    recorder.blocks.push({ marker, out, parts });
    return marker;
  });
  return recorder;
}
