import { join } from 'node:path';
import { parseBalancerConfig } from '../balancer/config.js';
import { RenderError, codes, errorMessage } from '../errors.js';
import { writeFileAtomic } from '../fs/atomic-write.js';
import type { RenderContext, Template } from './templates.js';

export const balancerFile = 'balancer.json';
export const hostsFile = 'hosts';

export interface RenderedFile {
  output: string;
  text: string;
}

/** Files the data plane loads are checked before they can replace a working one. */
function check(output: string, text: string, file: string): void {
  if (output === balancerFile) {
    try {
      parseBalancerConfig(text, file);
    } catch (cause) {
      throw new RenderError(codes.renderTemplate, `${file} rendered a balancer.json that does not load: ${errorMessage(cause)}`, { cause });
    }
  }
}

/** Pure: templates + context -> file contents, and the templates that failed. */
export function renderAll(
  templates: readonly Template[],
  context: RenderContext,
): { files: RenderedFile[]; errors: RenderError[]; failed: string[] } {
  const files: RenderedFile[] = [];
  const errors: RenderError[] = [];
  const failed: string[] = [];
  for (const t of templates) {
    try {
      const text = t.render(context);
      check(t.output, text, t.file);
      files.push({ output: t.output, text });
    } catch (err) {
      failed.push(t.output);
      errors.push(err instanceof RenderError ? err : new RenderError(codes.renderTemplate, `${t.file}: ${errorMessage(err)}`, { cause: err }));
    }
  }
  return { files, errors, failed };
}

/** Writes each file that changed; a file whose template failed keeps its previous content. */
export async function writeRendered(runDir: string, files: readonly RenderedFile[]): Promise<{ changed: string[]; errors: RenderError[] }> {
  const changed: string[] = [];
  const errors: RenderError[] = [];
  for (const f of files) {
    const path = join(runDir, f.output);
    try {
      if (await writeFileAtomic(path, f.text)) changed.push(f.output);
    } catch (cause) {
      errors.push(new RenderError(codes.renderWrite, `cannot write ${path}: ${errorMessage(cause)}`, { cause }));
    }
  }
  return { changed, errors };
}
