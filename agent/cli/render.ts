import { join } from 'node:path';
import { AddressBook } from '../consul/address-book.js';
import { SelectedWatcher } from '../consul/services-list.js';
import { ConsulClient, consulClientOptions } from '../consul/client.js';
import { errorMessage } from '../errors.js';
import { readFileIfExists } from '../fs/atomic-write.js';
import { silentLogger } from '../log.js';
import { plan, planLabels } from '../plan/plan.js';
import { renderAll } from '../render/render.js';
import { builtinTemplatesDir, loadTemplates } from '../render/templates.js';
import { sleep } from '../sleep.js';
import { readTrafficDocs } from '../consul/traffic-watcher.js';
import { loadConfig, parseFlags, UsageError } from './args.js';
import { usage } from './usage.js';

/** Renders every template from one read of the catalog and prints the files; writes nothing. */
export async function renderDryRun(argv: string[]): Promise<number> {
  const flags = parseFlags(argv, { config: { type: 'string' }, 'dry-run': { type: 'boolean' } });
  if (flags.help) {
    process.stdout.write(usage.render());
    return 0;
  }
  if (!flags['dry-run']) throw new UsageError('render: expected --dry-run (the agent writes files; render only shows them)');
  const config = loadConfig(flags, process.env);
  const log = silentLogger();
  const client = new ConsulClient(consulClientOptions(config, log));
  let catalog: Parameters<typeof plan>[0] | undefined;
  // The same selection as the agent's (a --services-kv list included).
  const watcher = new SelectedWatcher({
    client,
    logger: log,
    services: config.services,
    servicesKv: config.servicesKv,
    always: [],
    tag: config.tag,
    maxWatches: config.maxWatches,
    filter: { allowWarning: config.allowWarning },
    waitMs: config.consulWaitMs,
    onCatalog: (c) => (catalog = c),
    onProblems: () => undefined,
  });
  watcher.start();
  const timeout = new AbortController();
  await Promise.race([watcher.ready, sleep(10_000, timeout.signal)]);
  timeout.abort();
  await watcher.stop();
  try {
    if (!catalog) {
      process.stderr.write(`loopmesh: could not read the catalog from Consul at ${config.consul} within 10 s: ${watcher.status().lastError?.message ?? 'no answer'}\n`);
      return 1;
    }
    const book = new AddressBook({ client, logger: log, key: `${config.kvPrefix}/addresses`, range: config.range, cacheFile: join(config.runDir, 'addresses.json') });
    await book.load();
    const { labels, problems: labelProblems } = planLabels([...catalog.keys()]);
    const table = await book.preview([...labels.values()]);
    const traffic = await readTrafficDocs(client, `${config.kvPrefix}/traffic`);
    const planned = plan(catalog, table, [], { suffix: config.suffix, empty: config.empty, range: config.range, policy: config.lbPolicy, traffic: traffic.docs });
    const { templates, errors: loadErrors } = await loadTemplates([builtinTemplatesDir(), ...(config.templates ? [config.templates] : [])]);
    const rendered = renderAll(templates, { routes: planned.routes, suffix: config.suffix });
    for (const f of rendered.files) {
      const path = join(config.runDir, f.output);
      const current = await readFileIfExists(path);
      const state = current === f.text ? 'unchanged' : current === undefined ? 'new' : 'would change';
      process.stdout.write(`==> ${path} (${state}) <==\n${f.text}${f.text.endsWith('\n') ? '' : '\n'}\n`);
    }
    const problems = [...new Set([...watcher.currentProblems(), ...book.problems(), ...traffic.problems, ...labelProblems, ...planned.problems].map((p) => `${p.code}: ${p.message}`))];
    for (const p of problems) process.stderr.write(`problem ${p}\n`);
    for (const e of [...loadErrors, ...rendered.errors]) process.stderr.write(`template error ${e.code}: ${e.message}\n`);
    return loadErrors.length + rendered.errors.length > 0 ? 1 : 0;
  } catch (err) {
    process.stderr.write(`loopmesh: ${errorMessage(err)}\n`);
    return 1;
  } finally {
    client.close();
  }
}
