import { stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import { debounce, type Debounced } from '../debounce.js';
import { errorCode, errorMessage } from '../errors.js';
import { prepareRunDir, readRunDirFile } from '../fs/run-dir.js';
import { isLastWrittenHere } from '../fs/atomic-write.js';
import type { Logger } from '../log.js';
import { parseBalancerConfig, type BalancerConfig } from '../contract/balancer-config.js';
import type { AddressRange } from '../plan/addresses.js';

/** chokidar drops a 'change' that comes within 50 ms of the previous one on the same path. */
const missedChangeWindowMs = 100;
/** chokidar goes silent when its folder is deleted or renamed away: how often the folder's identity is compared. */
const defaultDirCheckMs = 1000;

/** Which folder a path names now (a symlink followed), or undefined when none. The birth time tells a recreated folder that got the freed inode back. */
async function folderIdentity(path: string): Promise<string | undefined> {
  try {
    const info = await stat(path);
    return info.isDirectory() ? `${info.dev}:${info.ino}:${info.birthtimeMs}` : undefined;
  } catch {
    return undefined;
  }
}

/** What the in-process renderer just wrote to the file, already parsed with the same options. */
export interface RenderedBalancer {
  text: string;
  config: BalancerConfig;
}

export interface BalancerFileSourceOptions {
  /** The rendered balancer.json. */
  path: string;
  logger: Logger;
  /** Gets each new valid config; while it runs, the next load waits. */
  onConfig: (config: BalancerConfig) => void | Promise<void>;
  /** How often to check whether the run dir was deleted, recreated or replaced (ms). */
  dirCheckMs?: number;
  /** A gateway: services listen inside this range (loopback otherwise). */
  gatewayRange?: AddressRange;
}

/**
 * Follows the rendered balancer.json: loads it, checks it, and hands over each new valid version.
 * An invalid file is reported and ignored, so the last good config stays in service. A run dir that
 * is deleted and recreated, or replaced by a rename, is followed again.
 */
export class BalancerFileSource {
  private readonly path: string;
  private readonly dir: string;
  private readonly logger: Logger;
  private watcher: FSWatcher | undefined;
  /** The folder the watcher follows (folderIdentity), undefined while there is none. */
  private watchedDir: string | undefined;
  private dirTimer: NodeJS.Timeout | undefined;
  private dirCheck: Promise<void> | undefined;
  /** The run dir is gone (said once). */
  private dirGone = false;
  /** The last read failure logged, so a lasting one is said once. */
  private readFailure: string | undefined;
  private readonly onFileEvent: Debounced;
  private recheck: NodeJS.Timeout | undefined;
  private loading: Promise<void> = Promise.resolve();
  /** The config in service and the text it came from: the file's bytes, or the renderer's string. */
  private applied: { text: Buffer | string; config: BalancerConfig } | undefined;
  /**
   * The renderer of this process hands its configs in (reload with `rendered`), before it writes the
   * file: a file this process wrote last is then never read back (it may be the one before).
   */
  private renderedHere = false;
  private rejectedText: Buffer | undefined;
  private closed = false;

  constructor(private readonly options: BalancerFileSourceOptions) {
    this.path = resolve(options.path);
    this.dir = dirname(this.path);
    this.logger = options.logger.child({ file: this.path });
    this.onFileEvent = debounce(() => {
      void this.reload();
      this.recheckLater();
    }, 20, 200);
  }

  current(): BalancerConfig | undefined {
    return this.applied?.config;
  }

  /** Creates and checks the run dir (prepareRunDir), loads the file if it exists, then follows it; resolves once the watcher is ready. */
  async start(): Promise<void> {
    // A folder that does not exist yet cannot be watched: a data plane started before the first
    // render (its own process, say) would never see the file appear.
    await prepareRunDir(this.dir);
    await this.reload();
    await this.watchDir();
    // A write between the first load and the watcher being ready would otherwise go unseen.
    await this.reload();
    this.dirTimer = setInterval(() => void this.checkDir(), this.options.dirCheckMs ?? defaultDirCheckMs);
    this.dirTimer.unref();
  }

  private async watchDir(): Promise<void> {
    const identity = await folderIdentity(this.dir);
    if (identity === undefined || this.closed) return;
    // The renderer replaces the file by rename, so watch its folder rather than the file's inode.
    const watcher = watch(this.dir, {
      depth: 0,
      ignoreInitial: true,
      atomic: false,
      awaitWriteFinish: false,
      // A symlink is refused when read (readRunDirFile); its creation must still be an event.
      followSymlinks: false,
      ignored: (path) => path !== this.dir && path !== this.path,
    });
    this.watcher = watcher;
    this.watchedDir = identity;
    const isOurs = (path: string): boolean => resolve(path) === this.path;
    watcher.on('add', (path) => isOurs(path) && this.onFileEvent());
    watcher.on('change', (path) => isOurs(path) && this.onFileEvent());
    watcher.on('unlink', (path) => {
      if (isOurs(path)) this.logger.warn('balancer config file removed; the last good config stays in service');
    });
    watcher.on('unlinkDir', (path) => {
      if (resolve(path) !== this.dir) return;
      // Deleted, so this watcher is dead whatever the folder there now looks like.
      this.watchedDir = 'deleted';
      void this.checkDir();
    });
    watcher.on('error', (err) => {
      this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'watching the balancer config failed');
      void this.checkDir();
    });
    await new Promise<void>((ready) => watcher.once('ready', ready));
  }

  /** Follows the run dir again when it was deleted and recreated, or another folder was renamed in its place. */
  private checkDir(): Promise<void> {
    this.dirCheck ??= (async () => {
      const identity = await folderIdentity(this.dir);
      if (this.closed) return;
      if (this.watcher && identity === this.watchedDir) {
        // A refused read (a dir or file others may write) is retried: a chmod or chown fixes it without a new render.
        if (this.readFailure !== undefined) await this.reload();
        return;
      }
      await this.watcher?.close();
      this.watcher = undefined;
      this.watchedDir = undefined;
      if (identity === undefined) {
        if (!this.dirGone) this.logger.warn({ dir: this.dir }, 'run dir removed; the last good config stays in service until it is back');
        this.dirGone = true;
        return;
      }
      this.dirGone = false;
      this.logger.info({ dir: this.dir }, 'run dir recreated or replaced; following the new one');
      await this.watchDir();
      await this.reload();
    })().finally(() => (this.dirCheck = undefined));
    return this.dirCheck;
  }

  /**
   * Reads the file now; loads queue up, so a caller that just wrote the file sees its write applied.
   * `rendered`: the content the caller just wrote there atomically, parsed; used instead of a read.
   */
  reload(rendered?: RenderedBalancer): Promise<void> {
    const run = this.loading.then(() => this.load(rendered));
    this.loading = run.catch(() => undefined);
    return run;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.onFileEvent.cancel();
    clearTimeout(this.recheck);
    clearInterval(this.dirTimer);
    await this.dirCheck;
    await this.watcher?.close();
    await this.loading;
  }

  /** Reads once more after an event, in case the watcher swallowed a write that followed it closely. */
  private recheckLater(): void {
    clearTimeout(this.recheck);
    this.recheck = setTimeout(() => void this.reload(), missedChangeWindowMs);
  }

  private async load(rendered?: RenderedBalancer): Promise<void> {
    if (this.closed) return;
    if (rendered) {
      this.renderedHere = true;
      // The same checked service objects in the same order (the parser keeps an unchanged service's
      // object): the config in service, without comparing megabytes of text.
      const applied = this.applied?.config.services;
      if (applied && applied.length === rendered.config.services.length && applied.every((s, i) => s === rendered.config.services[i])) return;
      return this.use(rendered.text, rendered.config);
    }
    // Our own last write: its config was handed in already, and it may be older than the one in
    // service (the data plane serves a change before the files are written). Another writer's file
    // (a new inode, size or change time) is read as usual.
    if (this.renderedHere && (await isLastWrittenHere(this.path))) return;
    let text: Buffer;
    try {
      // The run dir is untrusted: another user's file, a symlink or a FIFO there is refused.
      text = await readRunDirFile(this.path);
    } catch (err) {
      if (errorCode(err) === 'ENOENT') {
        this.logger.debug('balancer config file does not exist yet');
      } else if (errorMessage(err) !== this.readFailure) {
        this.readFailure = errorMessage(err);
        this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'cannot read the balancer config; the last good config stays in service');
      }
      return;
    }
    this.readFailure = undefined;
    if (this.isApplied(text) || this.rejectedText?.equals(text)) return;

    let config: BalancerConfig;
    try {
      config = parseBalancerConfig(text.toString('utf8'), this.path, { gatewayRange: this.options.gatewayRange });
    } catch (err) {
      this.rejectedText = text;
      this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'invalid balancer config ignored; the last good config stays in service');
      return;
    }
    await this.use(text, config);
  }

  private isApplied(text: Buffer | string): boolean {
    const applied = this.applied?.text;
    if (applied === undefined) return false;
    if (typeof applied === 'string') return typeof text === 'string' ? applied === text : applied === text.toString('utf8');
    return typeof text === 'string' ? applied.toString('utf8') === text : applied.equals(text);
  }

  private async use(text: Buffer | string, config: BalancerConfig): Promise<void> {
    if (this.isApplied(text)) return;
    this.rejectedText = undefined;
    try {
      await this.options.onConfig(config);
    } catch (err) {
      // Not recorded as applied, and retried by the folder check each second (a port freed, fds back).
      if (errorMessage(err) !== this.readFailure) this.logger.error({ code: errorCode(err), err: errorMessage(err) }, 'applying the balancer config failed');
      this.readFailure = errorMessage(err);
      return;
    }
    this.applied = { text, config };
    this.readFailure = undefined;
    this.logger.info({ services: config.services.length }, 'balancer config loaded');
  }
}
