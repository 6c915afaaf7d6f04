import cluster, { type Worker } from 'node:cluster';
import { hostname } from 'node:os';
import type { StatusReport } from '../admin/report.js';
import { DataPlaneError, codes, errorCode, errorMessage, type Problem } from '../errors.js';
import type { Logger } from '../log.js';
import { sleep } from '../sleep.js';
import { mergeReports, RetiredTotals, type WorkerView, type WorkersStatusReport } from './merge.js';
import { parseWorkerMessage, workerIndexEnv, type PrimaryMessage } from './messages.js';

/** How long a worker gets to start, and a hot restart's new worker to serve what the old one served. */
const startTimeoutMs = 30_000;
/** How long the admin waits for each worker's report. */
const reportTimeoutMs = 2000;
/** A worker that dies sooner than this after its start counts as a crash loop: replaced with backoff. */
const crashLoopMs = 10_000;
const backoffBaseMs = 500;
const backoffMaxMs = 30_000;

export interface SupervisorOptions {
  workers: number;
  drainTimeoutMs: number;
  logger: Logger;
}

interface Member {
  index: number;
  worker: Worker;
  pid: number;
  startedAt: number;
  state: 'starting' | 'serving' | 'draining' | 'down';
  /** Resolves once the worker serves (its data plane started); rejects if it fails or exits first. */
  started: Promise<void>;
  /** A hot restart's candidate: becomes serving only once it serves what the old worker served. */
  candidate: boolean;
  /** It said it started: from then on it answers report requests. */
  hasStarted: boolean;
  exit: string | undefined;
  lastReport: StatusReport | undefined;
  finalReport: StatusReport | undefined;
  pending: Map<number, (report: StatusReport | undefined) => void>;
}

interface Slot {
  index: number;
  current: Member | undefined;
  /** A hot restart's new worker for this slot, until it takes over. */
  next: Member | undefined;
  restarts: number;
  crashes: number;
  timer: NodeJS.Timeout | undefined;
}

const key = (r: StatusReport['routes'][number]): string => `${r.service}@${r.address}:${r.port}`;

/**
 * The cluster primary of `loopmesh balancer --workers N`: forks N workers (each the ordinary data
 * plane) and keeps them running, answers the admin with their merged reports, and on a hot restart
 * replaces them one by one. It never accepts a connection: with cluster.SCHED_NONE it binds each
 * listening socket once, when the first worker asks, and hands the same socket to every worker; it
 * keeps its copy open while any worker listens on it, so a worker that dies closes nothing, and the
 * connections waiting in the kernel's queue go to the other workers.
 */
export class Supervisor {
  private readonly slots: Slot[];
  private readonly draining = new Set<Member>();
  private readonly retired = new RetiredTotals();
  private readonly log: Logger;
  private stopping: Promise<void> | undefined;
  private restarting = false;
  private nextRequest = 1;

  constructor(private readonly options: SupervisorOptions) {
    this.log = options.logger.child({ supervisor: process.pid });
    this.slots = Array.from({ length: options.workers }, (_, index) => ({ index, current: undefined, next: undefined, restarts: 0, crashes: 0, timer: undefined }));
  }

  /** Forks every worker and resolves once all serve; rejects (all stopped) when one fails to start. */
  async start(): Promise<void> {
    // Before the first fork (cluster freezes it then): the primary binds and shares, workers accept.
    cluster.schedulingPolicy = cluster.SCHED_NONE;
    for (const slot of this.slots) slot.current = this.fork(slot.index, false);
    try {
      await Promise.all(this.slots.map((s) => s.current?.started));
    } catch (err) {
      await this.stop();
      throw err;
    }
  }

  pids(): number[] {
    return this.slots.flatMap((s) => (s.current ? [s.current.pid] : []));
  }

  private fork(index: number, candidate: boolean): Member {
    const worker = cluster.fork({ [workerIndexEnv]: String(index) });
    let onStarted: () => void = () => undefined;
    let onFailed: (err: Error) => void = () => undefined;
    const member: Member = {
      index,
      worker,
      pid: worker.process.pid ?? 0,
      startedAt: Date.now(),
      state: 'starting',
      started: new Promise<void>((resolve, reject) => {
        onStarted = resolve;
        onFailed = reject;
      }),
      candidate,
      hasStarted: false,
      exit: undefined,
      lastReport: undefined,
      finalReport: undefined,
      pending: new Map(),
    };
    // Awaited by whoever needs it; a rejection nobody awaits is not an error of the process.
    member.started.catch(() => undefined);
    worker.on('message', (raw: unknown) => {
      let message;
      try {
        message = parseWorkerMessage(raw);
      } catch (err) {
        this.log.error({ code: errorCode(err), worker: index, workerPid: member.pid }, errorMessage(err));
        return;
      }
      if (!message) return;
      switch (message.loopmesh) {
        case 'started':
          member.hasStarted = true;
          if (!member.candidate && member.state === 'starting') member.state = 'serving';
          this.log.info({ worker: index, workerPid: member.pid }, `worker ${index} (pid ${member.pid}) serves`);
          onStarted();
          break;
        case 'failed':
          onFailed(new DataPlaneError(codes.workerDown, `worker ${index} (pid ${member.pid}) could not start: ${message.message}`));
          break;
        case 'report':
          member.lastReport = message.report;
          member.pending.get(message.id)?.(message.report);
          member.pending.delete(message.id);
          break;
        case 'final':
          member.finalReport = message.report;
          break;
      }
    });
    worker.on('exit', (code: number | null, signal: string | null) => {
      member.exit = signal ? `killed by ${signal}` : `exited with code ${code ?? 0}`;
      onFailed(new DataPlaneError(codes.workerDown, `worker ${index} (pid ${member.pid}) ${member.exit} before it served`));
      this.onExit(member);
    });
    worker.on('error', (err) => this.log.warn({ code: errorCode(err), worker: index, workerPid: member.pid }, `worker ${index} IPC: ${errorMessage(err)}`));
    return member;
  }

  private onExit(member: Member): void {
    const wasDraining = member.state === 'draining';
    member.state = 'down';
    this.draining.delete(member);
    for (const resolve of member.pending.values()) resolve(undefined);
    member.pending.clear();
    // Its counters stay in the totals (the last it reported); its last message may still be on the way.
    const keep = (): void => {
      const last = member.finalReport ?? member.lastReport;
      if (last) this.retired.add(last);
    };
    if (member.worker.isConnected()) member.worker.once('disconnect', keep);
    else keep();
    if (this.stopping) return;
    if (wasDraining) {
      this.log.info({ worker: member.index, workerPid: member.pid }, `old worker ${member.index} (pid ${member.pid}) drained and ${member.exit ?? 'exited'}`);
      return;
    }
    const slot = this.slots[member.index];
    if (!slot || slot.current !== member) return;
    // A hot restart is starting this slot's next worker: that one takes the slot.
    if (slot.next) {
      this.log.error({ code: codes.workerDown, worker: member.index, workerPid: member.pid }, `worker ${member.index} (pid ${member.pid}) ${member.exit ?? 'exited'}; its hot-restart successor takes the slot`);
      return;
    }
    this.replaceLater(slot, member);
  }

  /** A dead worker is replaced at once, or with backoff when it keeps dying young. */
  private replaceLater(slot: Slot, dead: Member): void {
    slot.restarts += 1;
    slot.crashes = Date.now() - dead.startedAt < crashLoopMs ? slot.crashes + 1 : 0;
    const delay = slot.crashes <= 1 ? 0 : Math.min(backoffMaxMs, backoffBaseMs * 2 ** (slot.crashes - 2));
    this.log.error(
      { code: codes.workerDown, worker: slot.index, workerPid: dead.pid, delayMs: delay },
      `worker ${slot.index} (pid ${dead.pid}) ${dead.exit ?? 'exited'}; the other workers keep accepting, a replacement starts ${delay === 0 ? 'now' : `in ${delay} ms (it keeps dying young)`}`,
    );
    if (slot.timer) clearTimeout(slot.timer);
    slot.timer = setTimeout(() => {
      slot.timer = undefined;
      // A hot restart's new worker takes this slot instead.
      if (this.stopping || slot.current !== dead || slot.next) return;
      const member = this.fork(slot.index, false);
      slot.current = member;
      member.started.then(
        () => this.log.info({ worker: slot.index, workerPid: member.pid, replaced: dead.pid }, `worker ${slot.index} replaced: pid ${member.pid} serves`),
        (err: unknown) => this.log.error({ code: errorCode(err), worker: slot.index }, errorMessage(err)),
      );
    }, delay);
  }

  private send(member: Member, message: PrimaryMessage): void {
    if (member.state === 'down' || !member.worker.isConnected()) return;
    try {
      member.worker.send(message);
    } catch (err) {
      this.log.warn({ code: errorCode(err), worker: member.index, workerPid: member.pid }, `cannot reach worker ${member.index}: ${errorMessage(err)}`);
    }
  }

  /** A worker's report now, or undefined when it is down or does not answer in time. */
  private ask(member: Member): Promise<StatusReport | undefined> {
    // Before its start a worker has no handler yet: the request would only wait out the timeout.
    if (member.state === 'down' || !member.hasStarted) return Promise.resolve(undefined);
    const id = this.nextRequest++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        member.pending.delete(id);
        resolve(undefined);
      }, reportTimeoutMs);
      member.pending.set(id, (report) => {
        clearTimeout(timer);
        resolve(report);
      });
      this.send(member, { loopmesh: 'report', id });
    });
  }

  /** The admin's report: every worker asked now, merged. */
  async report(): Promise<WorkersStatusReport> {
    const members = [...this.slots.flatMap((s) => [s.current, s.next].filter((m): m is Member => m !== undefined)), ...this.draining];
    const reports = await Promise.all(members.map((m) => this.ask(m)));
    const views = members.map((m, i): WorkerView => {
      const report = reports[i];
      const slot = this.slots[m.index];
      let problem: Problem | undefined;
      const isCurrent = slot?.current === m;
      if (isCurrent && m.state === 'down') problem = { code: codes.workerDown, message: `worker ${m.index} (pid ${m.pid}) ${m.exit ?? 'is down'}; a replacement is on its way` };
      else if (isCurrent && m.state === 'starting') problem = { code: codes.workerDown, message: `worker ${m.index} (pid ${m.pid}) is starting` };
      else if (isCurrent && !report) problem = { code: codes.workerDown, message: `worker ${m.index} (pid ${m.pid}) did not answer within ${reportTimeoutMs} ms` };
      return { index: m.index, pid: m.pid, state: m.state, startedAt: m.startedAt, restarts: slot?.restarts ?? 0, report, ...(problem ? { problem } : {}) };
    });
    return mergeReports(hostname(), views, this.retired, this.options.workers);
  }

  /**
   * Hot restart: each worker in turn is replaced by a new one forked from the code on disk. The new
   * one starts on the same shared sockets; once it serves every route the old one served, the old
   * one stops accepting and drains. If a new worker fails, the restart stops there and the workers
   * not yet replaced keep serving. The supervisor itself stays.
   */
  async hotRestart(): Promise<void> {
    if (this.stopping) return;
    if (this.restarting) {
      this.log.warn({ code: codes.workerRestart }, 'SIGUSR2: a hot restart of the workers is already running');
      return;
    }
    this.restarting = true;
    const from = this.pids();
    try {
      for (const slot of this.slots) {
        if (this.stopping) return;
        await this.restartSlot(slot);
      }
      this.log.info({ from, to: this.pids() }, `hot restart done: ${this.slots.length} new workers serve, the old ones drain`);
    } finally {
      this.restarting = false;
    }
  }

  private async restartSlot(slot: Slot): Promise<void> {
    const old = slot.current;
    const oldReport = old && old.state === 'serving' ? await this.ask(old) : undefined;
    const next = this.fork(slot.index, true);
    slot.next = next;
    try {
      let timer: NodeJS.Timeout | undefined;
      const deadline = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new DataPlaneError(codes.workerRestart, `the new worker did not serve within ${startTimeoutMs} ms`)), startTimeoutMs);
      });
      try {
        await Promise.race([next.started, deadline]);
        await Promise.race([this.servesLike(next, oldReport), deadline]);
      } finally {
        clearTimeout(timer);
      }
    } catch (err) {
      slot.next = undefined;
      if (next.state !== 'down') next.worker.process.kill('SIGKILL');
      // The old worker died meanwhile: its slot gets an ordinary replacement.
      if (old && old.state === 'down' && slot.current === old) this.replaceLater(slot, old);
      throw new DataPlaneError(codes.workerRestart, `hot restart of worker ${slot.index} failed: ${errorMessage(err)}; the workers not yet replaced keep serving`, { cause: err });
    }
    slot.next = undefined;
    next.candidate = false;
    next.state = 'serving';
    slot.current = next;
    slot.crashes = 0;
    if (old && old.state !== 'down') {
      old.state = 'draining';
      this.draining.add(old);
      this.send(old, { loopmesh: 'drain' });
    }
    this.log.info({ worker: slot.index, workerPid: next.pid, oldPid: old?.pid }, `worker ${slot.index}: new pid ${next.pid} serves; old pid ${old?.pid ?? '-'} stops accepting and drains`);
  }

  /** Resolves once `next` listens on every route the old worker listened on. */
  private async servesLike(next: Member, old: StatusReport | undefined): Promise<void> {
    const wanted = (old?.routes ?? []).filter((r) => r.listening).map(key);
    for (;;) {
      if (next.state === 'down') throw new DataPlaneError(codes.workerRestart, `the new worker ${next.exit ?? 'exited'}`);
      const report = await this.ask(next);
      const has = new Set((report?.routes ?? []).filter((r) => r.listening).map(key));
      if (report && wanted.every((k) => has.has(k))) return;
      await sleep(100);
    }
  }

  /** Every worker stops accepting and drains; resolves once all exited (killed after the drain timeout and 10 s). */
  stop(): Promise<void> {
    if (this.stopping) return this.stopping;
    this.stopping = (async () => {
      for (const slot of this.slots) if (slot.timer) clearTimeout(slot.timer);
      const members = [...this.slots.flatMap((s) => [s.current, s.next]), ...this.draining].filter((m): m is Member => m !== undefined && m.state !== 'down');
      for (const m of members) this.send(m, { loopmesh: 'drain' });
      const deadline = Date.now() + this.options.drainTimeoutMs + 10_000;
      while (members.some((m) => m.state !== 'down') && Date.now() < deadline) await sleep(50);
      for (const m of members) if (m.state !== 'down') m.worker.process.kill('SIGKILL');
    })();
    return this.stopping;
  }

  /** At once: every worker killed (a second signal). */
  kill(): void {
    for (const m of [...this.slots.flatMap((s) => [s.current, s.next]), ...this.draining]) if (m && m.state !== 'down') m.worker.process.kill('SIGKILL');
  }
}
