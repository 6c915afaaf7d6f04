import { hostname } from 'node:os';
import { join } from 'node:path';
import { failingCodes, routeReport, servingProblems, type HealthReport, type StatusReport } from './admin/report.js';
import { AdminServer } from './admin/server.js';
import { Metrics } from './admin/metrics.js';
import type { AgentConfig } from './config/config.js';
import { AddressBook } from './consul/address-book.js';
import type { Catalog } from './consul/catalog.js';
import { SelectedWatcher } from './consul/services-list.js';
import { ConsulClient, consulClientOptions } from './consul/client.js';
import { TrafficWatcher } from './consul/traffic-watcher.js';
import { GatewayRegistration } from './consul/gateway-registration.js';
import { gatewaysOf, type Gateway, type GatewayProblem } from './plan/gateways.js';
import type { InheritedSockets } from './hot-restart/handover.js';
import { DataPlane } from './data-plane/data-plane.js';
import { prepareRunDir } from './fs/run-dir.js';
import { codes, errorCode, errorMessage, type Problem, type RenderError } from './errors.js';
import type { Logger } from './log.js';
import { Retry } from './retry.js';
import { IdleCollector } from './idle-gc.js';
import { plan, planLabels, PlanMemo, type PlanProblem, type Route } from './plan/plan.js';
import { balancerFile, hostsFile as renderedHostsFile } from './contract/files.js';
import { renderAll, writeRendered } from './render/render.js';
import { builtinTemplatesDir, loadTemplates, type Template } from './render/templates.js';

export type { Problem } from './errors.js';
export type { HealthReport } from './admin/report.js';

/** The rendered files the in-process data plane serves from (rendered, and served, before the others). */
const servingOutputs: ReadonlySet<string> = new Set([balancerFile, renderedHostsFile]);

/** watch -> plan -> render -> (files) -> data plane, with the admin API on the side. */
export class Agent {
  readonly client: ConsulClient;
  /** Catalog-wide (two long polls) or one long poll per listed service; see SelectedWatcher. */
  readonly watcher: SelectedWatcher;
  /** undefined with --render-only: a separate `loopmesh balancer` serves the rendered files. */
  readonly dataPlane: DataPlane | undefined;
  private readonly addresses: AddressBook;
  /** The per-service traffic documents in KV (<kv-prefix>/traffic/NAME): split, policy, limits, outlier. */
  readonly traffic: TrafficWatcher;
  private readonly admin: AdminServer | undefined;
  /** `loopmesh gateway`: its registration in Consul (undefined on a node). */
  readonly registration: GatewayRegistration | undefined;
  private gateways: Gateway[] = [];
  private registrationStarted = false;
  private gatewayProblems: GatewayProblem[] = [];
  private templates: Template[] = [];
  private templateErrors: RenderError[] = [];
  private catalog: Catalog | undefined;
  private routesValue: Route[] = [];
  /** Unchanged services keep their route objects between plans (see PlanOptions.memo). */
  private readonly planMemo = new PlanMemo();
  private catalogProblems: Problem[] = [];
  private planProblems: PlanProblem[] = [];
  private renderErrors: RenderError[] = [];
  private reconciling: Promise<void> | undefined;
  private again = false;
  /** A reconcile that failed for a reason no catalog change will fix (EMFILE, a full disk) runs again. */
  private readonly retry = new Retry(() => void this.reconcile());
  /** A full collection 5 s after the last change on a node routing 500 services or more (see IdleCollector). */
  private readonly idle: IdleCollector;
  private readonly reported = new Set<string>();
  lastRenderAt: number | undefined;
  /** The local Consul agent's node name, once it answered (reports fall back to the hostname). */
  nodeName: string | undefined;
  private nodeNameAsked = false;
  /** /metrics: the control plane's series (Consul calls, renders, reloads) besides the report's. */
  readonly metrics = new Metrics({ controlPlane: true });

  constructor(
    readonly config: AgentConfig,
    private readonly logger: Logger,
    /** From a predecessor (hot restart, SIGUSR2): its sockets and config. */
    inherited?: InheritedSockets,
  ) {
    this.client = new ConsulClient({ ...consulClientOptions(config, logger.child({ stage: 'consul' })), onCall: (call) => this.metrics.observeConsul(call) });
    this.idle = new IdleCollector({ quietMs: 5_000, minRoutes: 500, logger });
    this.addresses = new AddressBook({
      client: this.client,
      logger: logger.child({ stage: 'plan' }),
      key: `${config.kvPrefix}/addresses`,
      range: config.range,
      cacheFile: join(config.runDir, 'addresses.json'),
      waitMs: config.consulWaitMs,
      onRemoteChange: () => void this.reconcile(),
    });
    this.traffic = new TrafficWatcher({
      client: this.client,
      logger: logger.child({ stage: 'watch' }),
      prefix: `${config.kvPrefix}/traffic`,
      waitMs: config.consulWaitMs,
      onChange: () => void this.reconcile(),
    });
    this.watcher = new SelectedWatcher({
      client: this.client,
      logger: logger.child({ stage: 'watch' }),
      services: config.services,
      servicesKv: config.servicesKv,
      always: config.gatewayService ? [config.gatewayService] : [],
      tag: config.tag,
      maxWatches: config.maxWatches,
      filter: { allowWarning: config.allowWarning },
      waitMs: config.consulWaitMs,
      onCatalog: (catalog) => this.catalogChanged(catalog),
      onProblems: (problems) => {
        this.catalogProblems = problems;
        this.report(problems);
      },
    });
    this.dataPlane = config.renderOnly ? undefined : new DataPlane({
      runDir: config.runDir,
      logger,
      suffix: config.suffix,
      dns: config.dns,
      hostsFile: config.hostsFile,
      connectTimeoutMs: config.connectTimeoutMs,
      drainTimeoutMs: config.drainTimeoutMs,
      idleTimeoutMs: config.idleTimeoutMs,
      maxConnections: config.maxConnections,
      queue: config.queue,
      queueTimeoutMs: config.queueTimeoutMs,
      backendDrain: config.backendDrain,
      gatewayRange: config.gatewayRange,
      inherited,
    });
    this.registration = config.gatewayRange
      ? new GatewayRegistration({
          client: this.client,
          logger: logger.child({ stage: 'gateway' }),
          service: config.gatewayService ?? 'loopmesh-gateway',
          id: config.gatewayId,
          range: config.gatewayRange,
          mirrored: config.range,
          checkUrl: config.gatewayCheck ?? (config.admin ? `http://${config.admin.host.includes(':') ? `[${config.admin.host}]` : config.admin.host}:${config.admin.port}/health/live` : ''),
        })
      : undefined;
    this.admin = config.admin ? new AdminServer({ endpoint: config.admin, report: () => this.statusReport(), logger: logger.child({ stage: 'admin' }), metrics: this.metrics }) : undefined;
  }

  /** With `admin: false` (a hot restart's successor) the admin HTTP is started later, by the caller. */
  async start(options: { admin?: boolean } = {}): Promise<void> {
    // Refuses (ConfigError, exit 2) a run dir another user could write: it decides what is bound and published.
    await prepareRunDir(this.config.runDir);
    const dirs = [builtinTemplatesDir(), ...(this.config.templates ? [this.config.templates] : [])];
    const loaded = await loadTemplates(dirs);
    this.templates = loaded.templates;
    this.templateErrors = loaded.errors;
    for (const err of loaded.errors) this.logger.error({ code: err.code }, err.message);
    // The data plane first: after a restart it serves the last rendered files before Consul answers.
    await this.dataPlane?.start();
    await this.addresses.load();
    if (options.admin !== false) await this.admin?.start();
    this.addresses.start();
    this.traffic.start();
    this.watcher.start();
  }

  /** With `drain` (a signal), open connections may finish before the process goes; see DataPlane.close. */
  async stop(options: { drain?: boolean; handedOver?: boolean } = {}): Promise<void> {
    this.retry.stop();
    this.idle.stop();
    // A gateway that handed over to its successor stays registered: the successor is the same gateway.
    await Promise.all([this.watcher.stop(), this.addresses.stop(), this.traffic.stop(), this.registration?.stop({ deregister: !options.handedOver })]);
    await this.reconciling;
    await this.admin?.close();
    await this.dataPlane?.close(options);
    this.client.close();
  }

  routes(): readonly Route[] {
    return this.routesValue;
  }

  problems(): Problem[] {
    const all: Problem[] = [
      ...this.catalogProblems,
      ...this.gatewayProblems,
      ...(this.registration?.problems() ?? []),
      ...this.addresses.problems(),
      ...this.traffic.problems(),
      ...this.planProblems,
      ...this.templateErrors,
      ...this.renderErrors,
      ...this.servingProblems(),
      ...(this.dataPlane?.hostsProblems() ?? []),
    ];
    const seen = new Set<string>();
    return all
      .map((p) => ({ ...(p.service !== undefined ? { service: p.service } : {}), code: p.code, message: p.message }))
      .filter((p) => {
        const key = `${p.code}:${p.service ?? ''}:${p.message}`;
        if (seen.has(key)) return false;
        seen.add(key);
        return true;
      });
  }

  /** ok only when Consul answers, the last render succeeded and every planned route is served. */
  health(problems: readonly Problem[] = this.problems()): HealthReport {
    const reasons = problems.filter((p) => failingCodes.has(p.code));
    const consul = this.watcher.status();
    if (!consul.connected) {
      reasons.unshift({ code: consul.lastError?.code ?? codes.consulUnreachable, message: `Consul unreachable, serving the last-known-good routes: ${consul.lastError?.message ?? 'no answer yet'}` });
      return { status: 'degraded', reasons };
    }
    return { status: reasons.length === 0 ? 'ok' : 'failing', reasons };
  }

  /** Planned routes the in-process data plane does not serve (a port taken, an address refused). */
  private servingProblems(): Problem[] {
    const plane = this.dataPlane;
    if (!plane || this.lastRenderAt === undefined) return [];
    return servingProblems(this.routesValue, plane.balancer.snapshot());
  }

  /** What the admin serves: the live balancer's view when it runs here, the planned routes otherwise. */
  statusReport(): StatusReport {
    const plane = this.dataPlane;
    const problems = this.problems();
    return routeReport({
      node: this.nodeName ?? hostname(),
      consul: this.watcher.status(),
      lastRenderAt: this.lastRenderAt,
      specs: plane ? plane.config()?.services ?? [] : this.routes(),
      served: plane?.balancer.snapshot(),
      problems,
      health: this.health(problems),
      dns: plane?.dns?.stats(),
    });
  }

  adminServer(): AdminServer | undefined {
    return this.admin;
  }

  adminUrl(): string | undefined {
    return this.admin?.url();
  }

  private catalogChanged(catalog: Catalog): void {
    this.catalog = catalog;
    this.learnNodeName();
    void this.reconcile();
  }

  /** Once, after Consul first answers: the node name for reports (network namespaces share a hostname). */
  private learnNodeName(): void {
    if (this.nodeNameAsked) return;
    this.nodeNameAsked = true;
    this.client.nodeName().then(
      (name) => (this.nodeName = name),
      (err: unknown) => {
        this.nodeNameAsked = false;
        this.logger.debug({ code: errorCode(err) }, `cannot read the Consul agent's node name: ${errorMessage(err)}`);
      },
    );
  }

  /** One reconcile at a time; a change during one runs another right after. */
  private reconcile(): Promise<void> {
    if (this.reconciling) {
      this.again = true;
      return this.reconciling;
    }
    this.reconciling = (async () => {
      let threw = false;
      do {
        this.again = false;
        threw = false;
        try {
          await this.reconcileOnce();
        } catch (err) {
          threw = true;
          this.logger.error({ code: errorCode(err), err }, 'reconcile failed; the last rendered files stay in service');
          this.metrics.rendered({ failed: true, reloaded: false });
        }
      } while (this.again);
      this.retryLater(threw || this.renderErrors.some((e) => e.code === codes.renderWrite) || this.planProblems.some((p) => p.code === codes.planNoAddress) || this.dataPlaneBehind());
    })().finally(() => (this.reconciling = undefined));
    return this.reconciling;
  }

  /** The in-process data plane does not serve the rendered files: a read or a hosts write failed (EMFILE), or a port is taken. */
  private dataPlaneBehind(): boolean {
    // Dropped hosts lines are the rendered content's fault: writing again changes nothing.
    return this.servingProblems().length > 0 || (this.dataPlane?.hostsProblems().some((p) => p.code !== codes.hostsInvalidLine) ?? false);
  }

  /** Without this, files not written when file descriptors ran out stayed stale until the catalog changed. */
  private retryLater(failed: boolean): void {
    if (failed) this.retry.failed();
    else this.retry.succeeded();
  }

  private async reconcileOnce(): Promise<void> {
    const catalog = this.catalog;
    // Until KV answered (or failed once), a plan would drop every split for a moment after a restart.
    if (!catalog || !this.traffic.settled()) return;
    const gatewayService = this.config.gatewayService;
    const skip = new Set(gatewayService ? [gatewayService] : []);
    // A node's proxy cluster; a gateway never forwards to gateways (the service is skipped all the same).
    if (gatewayService && !this.config.gatewayRange) {
      const found = gatewaysOf(gatewayService, catalog.get(gatewayService) ?? [], this.config.range);
      this.gateways = found.gateways;
      this.gatewayProblems = found.problems;
      this.report(found.problems);
    }
    const labelled = planLabels([...catalog.keys()].filter((s) => !skip.has(s)));
    const { labels } = labelled;
    const t0 = performance.now();
    const { table } = await this.addresses.ensure([...labels.values()]);
    const t1 = performance.now();
    const planned = plan(catalog, table, this.routesValue, {
      suffix: this.config.suffix,
      empty: this.config.empty,
      range: this.config.range,
      policy: this.config.lbPolicy,
      traffic: this.traffic.docs(),
      gateways: this.gateways,
      gatewayRange: this.config.gatewayRange,
      skip,
      labels: labelled,
      memo: this.planMemo,
    });
    this.planProblems = planned.problems;
    this.report(planned.problems);
    const t2 = performance.now();
    // What the data plane serves (balancer.json, hosts) is rendered first, the other templates after it took the change.
    const context = { routes: planned.routes, suffix: this.config.suffix };
    const serving = renderAll(this.templates.filter((t) => servingOutputs.has(t.output)), context, { gatewayRange: this.config.gatewayRange });
    const t3 = performance.now();
    // The in-process data plane serves the change first, from what was just rendered and checked;
    // the files follow (they are what a separate balancer, a restart and an operator read).
    const balancerOut = serving.files.find((f) => f.output === balancerFile && f.config !== undefined);
    const hostsOut = serving.files.find((f) => f.output === renderedHostsFile);
    const inMemory = this.dataPlane !== undefined && balancerOut?.config !== undefined;
    if (inMemory && balancerOut?.config) await this.dataPlane?.reload({ balancer: { text: balancerOut.text, config: balancerOut.config }, ...(hostsOut ? { hosts: hostsOut.text } : {}) });
    const t4 = performance.now();
    const others = renderAll(this.templates.filter((t) => !servingOutputs.has(t.output)), context);
    const rendered = { files: [...serving.files, ...others.files], errors: [...serving.errors, ...others.errors], failed: [...serving.failed, ...others.failed] };
    // A run dir removed under us is made again (and checked again: a replaced one may be unsafe).
    await prepareRunDir(this.config.runDir);
    const written = await writeRendered(this.config.runDir, rendered.files);
    const t5 = performance.now();
    const known = new Set(this.renderErrors.map((e) => e.message));
    this.renderErrors = [...rendered.errors, ...written.errors];
    // Said once while it lasts: a lasting failure is retried, and each retry must not log it again.
    for (const err of this.renderErrors) if (!known.has(err.message)) this.logger.error({ code: err.code }, `${err.message}; the previous file stays in service`);
    if (!rendered.failed.includes(balancerFile)) this.routesValue = planned.routes;
    this.lastRenderAt = Date.now();
    if (written.changed.length > 0) this.logger.debug({ files: written.changed }, 'rendered');
    // Without a balancer.json rendered here, the data plane reads the files (also when nothing
    // changed but it is behind: its last read of them may have failed).
    const reload = written.changed.length > 0 || this.dataPlaneBehind();
    if (!inMemory && reload) await this.dataPlane?.reload();
    const ms = (a: number, b: number): number => Math.round(b - a);
    // Where a change's time goes (bench:converge --agent-log shows it per change).
    this.logger.debug({ routes: planned.routes.length, ms: { addresses: ms(t0, t1), plan: ms(t1, t2), render: ms(t2, t3), serve: ms(t3, t4), write: ms(t4, t5) } }, 'reconciled');
    this.metrics.rendered({ failed: this.renderErrors.length > 0, reloaded: reload });
    this.idle.touched(planned.routes.length);
    // A gateway enters the nodes' sets only once it serves what it rendered (a node would otherwise
    // try it, be refused and go on to the next address, for nothing).
    if (this.registration && !this.registrationStarted) {
      this.registrationStarted = true;
      this.registration.start();
    }
  }

  /** Each problem is logged once while it lasts, not on every change. */
  private report(problems: readonly { service?: string; code: string; message: string }[]): void {
    for (const p of problems) {
      const key = `${p.code}:${p.message}`;
      if (this.reported.has(key)) continue;
      this.reported.add(key);
      this.logger.warn({ code: p.code, service: p.service }, p.message);
    }
  }
}
