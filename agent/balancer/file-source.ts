import { mkdir, readFile } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import { debounce, type Debounced } from '../debounce.js';
import { errorCode, errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import { parseBalancerConfig, type BalancerConfig } from './config.js';

/** chokidar drops a 'change' that comes within 50 ms of the previous one on the same path. */
const missedChangeWindowMs = 100;

export interface BalancerFileSourceOptions {
  /** The rendered balancer.json. */
  path: string;
  logger: Logger;
  /** Gets each new valid config; while it runs, the next load waits. */
  onConfig: (config: BalancerConfig) => void | Promise<void>;
}

/**
 * Follows the rendered balancer.json: loads it, checks it, and hands over each new valid version.
 * An invalid file is reported and ignored, so the last good config stays in service.
 */
export class BalancerFileSource {
  private readonly path: string;
  private readonly logger: Logger;
  private watcher: FSWatcher | undefined;
  private readonly onFileEvent: Debounced;
  private recheck: NodeJS.Timeout | undefined;
  private loading: Promise<void> = Promise.resolve();
  private applied: { text: Buffer; config: BalancerConfig } | undefined;
  private rejectedText: Buffer | undefined;
  private closed = false;

  constructor(private readonly options: BalancerFileSourceOptions) {
    this.path = resolve(options.path);
    this.logger = options.logger.child({ file: this.path });
    this.onFileEvent = debounce(() => {
      void this.reload();
      this.recheckLater();
    }, 20, 200);
  }

  current(): BalancerConfig | undefined {
    return this.applied?.config;
  }

  /** Loads the file if it exists, then follows it; resolves once the watcher is ready. */
  async start(): Promise<void> {
    // A folder that does not exist yet cannot be watched: a data plane started before the first
    // render (its own process, say) would never see the file appear.
    await mkdir(dirname(this.path), { recursive: true });
    await this.reload();
    // The renderer replaces the file by rename, so watch its folder rather than the file's inode.
    const watcher = watch(dirname(this.path), {
      depth: 0,
      ignoreInitial: true,
      atomic: false,
      awaitWriteFinish: false,
      ignored: (path) => path !== dirname(this.path) && path !== this.path,
    });
    this.watcher = watcher;
    const isOurs = (path: string): boolean => resolve(path) === this.path;
    watcher.on('add', (path) => isOurs(path) && this.onFileEvent());
    watcher.on('change', (path) => isOurs(path) && this.onFileEvent());
    watcher.on('unlink', (path) => {
      if (isOurs(path)) this.logger.warn('balancer config file removed; the last good config stays in service');
    });
    watcher.on('error', (err) => this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'watching the balancer config failed'));
    await new Promise<void>((ready) => watcher.once('ready', ready));
    // A write between the first load and the watcher being ready would otherwise go unseen.
    await this.reload();
  }

  /** Reads the file now; loads queue up, so a caller that just wrote the file sees its write applied. */
  reload(): Promise<void> {
    const run = this.loading.then(() => this.load());
    this.loading = run.catch(() => undefined);
    return run;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.onFileEvent.cancel();
    clearTimeout(this.recheck);
    await this.watcher?.close();
    await this.loading;
  }

  /** Reads once more after an event, in case the watcher swallowed a write that followed it closely. */
  private recheckLater(): void {
    clearTimeout(this.recheck);
    this.recheck = setTimeout(() => void this.reload(), missedChangeWindowMs);
  }

  private async load(): Promise<void> {
    if (this.closed) return;
    let text: Buffer;
    try {
      text = await readFile(this.path);
    } catch (err) {
      if (errorCode(err) === 'ENOENT') {
        this.logger.debug('balancer config file does not exist yet');
      } else {
        this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'cannot read the balancer config');
      }
      return;
    }
    if (this.applied?.text.equals(text) || this.rejectedText?.equals(text)) return;

    let config: BalancerConfig;
    try {
      config = parseBalancerConfig(text.toString('utf8'), this.path);
    } catch (err) {
      this.rejectedText = text;
      this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'invalid balancer config ignored; the last good config stays in service');
      return;
    }
    this.rejectedText = undefined;
    try {
      await this.options.onConfig(config);
    } catch (err) {
      // Not recorded as applied, so the next load offers the same content again.
      this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'applying the balancer config failed');
      return;
    }
    this.applied = { text, config };
    this.logger.info({ services: config.services.length }, 'balancer config loaded');
  }
}
