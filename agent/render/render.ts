import { join } from 'node:path';
import { parseBalancerConfig, type BalancerConfig, type ParseOptions } from '../contract/balancer-config.js';
import { balancerFile } from '../contract/files.js';
import { RenderError, codes, errorMessage } from '../errors.js';
import { writeFileAtomic } from '../fs/atomic-write.js';
import type { RenderContext, Template } from './templates.js';

export interface RenderedFile {
  output: string;
  text: string;
  /** balancer.json: the config as the data plane will load it (checked here, so an in-process data plane need not read and parse it again). */
  config?: BalancerConfig;
}

/** Files the data plane loads are checked before they can replace a working one. */
function check(template: Template, text: string, options: ParseOptions): BalancerConfig | undefined {
  if (template.output !== balancerFile) return undefined;
  const file = template.file;
  try {
    // The template's routes blocks: only the services whose part changed are parsed again.
    return parseBalancerConfig(text, file, options, template.lastBlocks());
  } catch (cause) {
    throw new RenderError(codes.renderTemplate, `${file} rendered a balancer.json that does not load: ${errorMessage(cause)}`, { cause });
  }
}

/** Pure: templates + context -> file contents, and the templates that failed. */
export function renderAll(
  templates: readonly Template[],
  context: RenderContext,
  /** A gateway's balancer.json listens inside its range: checked as its data plane will. */
  options: ParseOptions = {},
): { files: RenderedFile[]; errors: RenderError[]; failed: string[] } {
  const files: RenderedFile[] = [];
  const errors: RenderError[] = [];
  const failed: string[] = [];
  for (const t of templates) {
    try {
      const text = t.render(context);
      const config = check(t, text, options);
      files.push(config ? { output: t.output, text, config } : { output: t.output, text });
    } catch (err) {
      failed.push(t.output);
      errors.push(err instanceof RenderError ? err : new RenderError(codes.renderTemplate, `${t.file}: ${errorMessage(err)}`, { cause: err }));
    }
  }
  return { files, errors, failed };
}

/**
 * The order files are written in: balancer.json last. A separate balancer process watches only that
 * file and reads the others (the hosts lines) when it changes, so they must be in place first.
 */
export function writeOrder(files: readonly RenderedFile[]): RenderedFile[] {
  return [...files.filter((f) => f.output !== balancerFile), ...files.filter((f) => f.output === balancerFile)];
}

/**
 * Writes each file that changed; a file whose template failed keeps its previous content. `written`
 * lists the files that now hold what was rendered (changed or already so).
 */
export async function writeRendered(runDir: string, files: readonly RenderedFile[]): Promise<{ changed: string[]; written: RenderedFile[]; errors: RenderError[] }> {
  const changed: string[] = [];
  const written: RenderedFile[] = [];
  const errors: RenderError[] = [];
  const write = async (f: RenderedFile): Promise<void> => {
    const path = join(runDir, f.output);
    try {
      if (await writeFileAtomic(path, f.text)) changed.push(f.output);
      written.push(f);
    } catch (cause) {
      errors.push(new RenderError(codes.renderWrite, `cannot write ${path}: ${errorMessage(cause)}`, { cause }));
    }
  };
  // The others side by side (each is its own atomic swap), then balancer.json alone, last.
  const ordered = writeOrder(files);
  await Promise.all(ordered.filter((f) => f.output !== balancerFile).map(write));
  for (const f of ordered.filter((f) => f.output === balancerFile)) await write(f);
  return { changed, written, errors };
}
