import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Handlebars from 'handlebars';
import { ConfigError, RenderError, codes, errorCode } from '../errors.js';
import { registerIncrementalEach, routesBlockUse, type RoutesBlock } from './incremental.js';

/** The templates shipped with loopmesh: <package>/templates, from agent/render or dist/agent/render. */
export function builtinTemplatesDir(): string {
  const here = fileURLToPath(new URL('.', import.meta.url));
  return here.includes(`${join('dist', 'agent')}`) ? join(here, '..', '..', '..', 'templates') : join(here, '..', '..', 'templates');
}

export interface Template {
  /** Output file name: the template's name without .hbs. */
  output: string;
  file: string;
  render: (context: RenderContext) => string;
  /**
   * The last render's `{{#each routes}}` block, when it had exactly one: the text before and after it
   * and each route's part in order (the text is prefix + parts joined + suffix). See incremental.ts.
   */
  lastBlocks: () => readonly RenderedBlock[];
}

/** A routes block within a rendered text: text === prefix + parts.join('') + suffix. */
export interface RenderedBlock {
  prefix: string;
  suffix: string;
  parts: readonly string[];
}

/**
 * The rendered text: each routes block's marker replaced by its output. Also the one block with the
 * text around it, when there is exactly one (a block whose output the template dropped is not there).
 */
function assemble(skeleton: string, blocks: readonly RoutesBlock[]): { text: string; rendered: RenderedBlock[] } {
  let text = skeleton;
  const found: RenderedBlock[] = [];
  for (const block of blocks) {
    const at = text.indexOf(block.marker);
    if (at < 0) continue;
    const prefix = text.slice(0, at);
    const suffix = text.slice(at + block.marker.length);
    found.push({ prefix, suffix, parts: block.parts });
    text = prefix + block.out + suffix;
  }
  return { text, rendered: found.length === 1 && blocks.length === 1 ? found : [] };
}

export interface RenderContext {
  routes: readonly unknown[];
  suffix: string;
}

function environment(): typeof Handlebars {
  const hb = Handlebars.create();
  hb.registerHelper('json', (value: unknown) => JSON.stringify(value));
  hb.registerHelper('eq', (a: unknown, b: unknown) => a === b);
  hb.registerHelper('min', (a: unknown, b: unknown) => Math.min(Number(a), Number(b)));
  hb.registerHelper('join', (list: unknown, sep: unknown) => (Array.isArray(list) ? list.join(typeof sep === 'string' ? sep : ',') : ''));
  return hb;
}

/** "Parse error on line 3" or "... - 3:10" -> 3, so the report names file and line. */
export function errorLine(message: string): number | undefined {
  const match = /line (\d+)/.exec(message) ?? / - (\d+):\d+\s*$/m.exec(message);
  return match?.[1] ? Number(match[1]) : undefined;
}

export function templateError(file: string, cause: unknown): RenderError {
  const message = cause instanceof Error ? cause.message : String(cause);
  const line = errorLine(message);
  const first = message.split('\n')[0] ?? message;
  const detail = /^Parse error/.test(first) ? message.split('\n').slice(-1)[0] ?? first : first;
  return new RenderError(codes.renderTemplate, `${file}${line ? `:${line}` : ''}: ${detail}`, { cause });
}

/** Compiles one template now, so a syntax error shows at load time with its line. */
export function compileTemplate(file: string, source: string, output: string): Template {
  const hb = environment();
  let ast: hbs.AST.Program;
  try {
    ast = hb.parse(source);
  } catch (cause) {
    throw templateError(file, cause);
  }
  // Each route's output is kept between renders where the template allows (see incremental.ts).
  const recorder = registerIncrementalEach(hb, routesBlockUse(ast));
  let last: RenderedBlock[] = [];
  const compiled = hb.compile(source, { noEscape: true, strict: true });
  return {
    output,
    file,
    lastBlocks: () => last,
    render: (context) => {
      recorder.blocks = [];
      last = [];
      try {
        const { text, rendered } = assemble(compiled(context), recorder.blocks);
        last = rendered;
        return text;
      } catch (cause) {
        throw templateError(file, cause);
      }
    },
  };
}

/**
 * The built-in templates, overridden file by file by a user's folder. A template that does not
 * compile is returned as an error, and the others still load.
 */
export async function loadTemplates(dirs: readonly string[]): Promise<{ templates: Template[]; errors: RenderError[] }> {
  const files = new Map<string, string>();
  for (const [i, dir] of dirs.entries()) {
    let names: string[];
    try {
      names = await readdir(dir);
    } catch (err) {
      // The first folder is the built-in one; the others come from --templates.
      if (i === 0) throw err;
      throw new ConfigError(codes.configInvalid, `--templates: cannot read the folder "${dir}" (${errorCode(err)}); expected a folder holding NAME.hbs templates`);
    }
    for (const name of names.filter((n) => n.endsWith('.hbs')).sort()) files.set(name.slice(0, -4), join(dir, name));
  }
  const templates: Template[] = [];
  const errors: RenderError[] = [];
  for (const [output, file] of files) {
    try {
      templates.push(compileTemplate(file, await readFile(file, 'utf8'), output));
    } catch (err) {
      errors.push(err instanceof RenderError ? err : templateError(file, err));
    }
  }
  return { templates, errors };
}
