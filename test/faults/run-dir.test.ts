import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { nobody, repoReadableByNobody } from '../support/nobody.js';
import { execa, type ResultPromise } from 'execa';
import { parseBalancerConfig, type ServiceSpec } from '../../agent/contract/balancer-config.js';
import { codes } from '../../agent/errors.js';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, whoAnswers, type IdServer } from '../support/net.js';
import { hostsPrelude, removeDir, startAgent } from '../support/agent.js';
import { captureLogger } from '../support/log.js';

/** The run directory as a trust boundary (issue 7, finding 6), with the real CLI as its own processes. */

const main = join(import.meta.dirname, '..', '..', 'agent', 'cli', 'main.ts');

interface Cli {
  process: ResultPromise;
  /** The JSON log lines seen so far on stderr. */
  log: Array<{ code?: string; msg?: string; err?: string }>;
  stderr: () => string;
}

/** `loopmesh ARGS` as its own process, optionally as user nobody (what the lab does). */
function loopmesh(args: string[], options: { asNobody?: string } = {}): Cli {
  // asNobody: the folder nobody can run the code from (repoReadableByNobody).
  const command = options.asNobody
    ? ['setpriv', `--reuid=${nobody}`, `--regid=${nobody}`, '--clear-groups', 'node', '--import', 'tsx', join(options.asNobody, 'agent', 'cli', 'main.ts'), ...args]
    : ['node', '--import', 'tsx', main, ...args];
  const child = execa(command[0]!, command.slice(1), { reject: false, stdio: ['ignore', 'ignore', 'pipe'], cleanup: true, cwd: options.asNobody, env: { CONSUL_HTTP_ADDR: '', LOOPMESH_LOG_FORMAT: 'json' } });
  let raw = '';
  let pending = '';
  const cli: Cli = { process: child, log: [], stderr: () => raw };
  child.stderr?.on('data', (chunk: Buffer) => {
    raw += chunk.toString('utf8');
    const lines = (pending + chunk.toString('utf8')).split('\n');
    pending = lines.pop() ?? '';
    for (const line of lines.filter(Boolean)) {
      try {
        cli.log.push(JSON.parse(line) as Cli['log'][number]);
      } catch {
        cli.log.push({ msg: line });
      }
    }
  });
  return cli;
}

async function stop(cli: Cli | undefined): Promise<void> {
  if (!cli || cli.process.exitCode !== null) return;
  cli.process.kill('SIGTERM');
  await cli.process;
}

async function route(runDir: string, service: string): Promise<ServiceSpec | undefined> {
  const text = await readFile(join(runDir, 'balancer.json'), 'utf8').catch(() => '');
  return text ? parseBalancerConfig(text).services.find((s) => s.service === service && s.backends.length > 0) : undefined;
}

function refused(address: string, port: number): Promise<boolean> {
  return whoAnswers(address, port, 1000).then(
    () => false,
    (err: Error) => /ECONNREFUSED/.test(err.message),
  );
}

describe('faults: the run directory', { timeout: 240_000 }, () => {
  let consul: TestConsul;
  let base: string;
  const servers: IdServer[] = [];
  const clis: Cli[] = [];

  before(async () => {
    consul = await TestConsul.start();
    base = await mkdtemp(join(tmpdir(), 'loopmesh-faults-run-dir-'));
    // User nobody must reach the run dirs below (the lab's layout).
    await chmod(base, 0o755);
  });

  after(async () => {
    await Promise.all(clis.map(stop));
    await Promise.all(servers.map((s) => s.close()));
    await consul?.close();
    if (base) await removeDir(base);
  });

  async function backend(id: string): Promise<IdServer> {
    const s = await startIdServer(id);
    servers.push(s);
    return s;
  }

  async function register(id: string, name: string, server: IdServer): Promise<number> {
    const port = await freePort();
    await consul.register({ id, name, port: server.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
    return port;
  }

  function start(args: string[], options: { asNobody?: string } = {}): Cli {
    const cli = loopmesh(args, options);
    clis.push(cli);
    return cli;
  }

  test('a run dir others may write, or another user owns: agent and balancer refuse to start (exit 2) with the fix, and touch nothing', async (t) => {
    const hosts = join(base, 'unsafe-hosts');
    await writeFile(hosts, hostsPrelude);
    const cases: Array<{ what: string; mode: number; owner: number }> = [
      { what: 'world-writable', mode: 0o777, owner: 0 },
      { what: 'group-writable', mode: 0o775, owner: 0 },
      { what: 'owned by another user', mode: 0o755, owner: nobody },
    ];
    for (const [i, c] of cases.entries()) {
      const runDir = join(base, `unsafe-${i}`);
      await mkdir(runDir);
      await chmod(runDir, c.mode);
      await chown(runDir, c.owner, 0);
      // What a local attacker would plant: a listener on every interface and a hosts line.
      await writeFile(join(runDir, 'balancer.json'), JSON.stringify({ version: 1, services: [{ service: 'evil', name: 'evil', fqdn: 'evil.local', address: '127.66.6.6', port: 6666, backends: [] }] }));
      await writeFile(join(runDir, 'hosts'), '127.66.6.6 bank.example.com\n');
      const runs = {
        balancer: start(['balancer', '--run-dir', runDir, '--hosts-file', hosts, '--dns', 'off']),
        agent: start(['agent', '--consul', consul.url, '--run-dir', runDir, '--hosts-file', hosts, '--dns', 'off', '--admin', 'off', '--range', '127.91.0.0/16']),
      };
      for (const [command, cli] of Object.entries(runs)) {
        const result = await cli.process;
        const where = `${command}, ${c.what}`;
        assert.equal(result.exitCode, 2, `${where}: exit 2 (${cli.stderr()})`);
        const text = cli.stderr();
        assert.match(text, new RegExp(`run dir ${runDir} is owned by uid ${c.owner} with mode 0${c.mode.toString(8)}`), where);
        assert.ok(text.includes(`chown 0 ${runDir} && chmod 755 ${runDir}`), `${where}: the fix is in the message: ${text}`);
        assert.match(text, /or use another --run-dir/, where);
      }
      t.diagnostic(`${c.what}: ${runs.balancer.stderr().trim()}`);
      assert.equal(await refused('127.66.6.6', 6666), true, 'nothing listens where the planted file asked');
      assert.equal(await readFile(hosts, 'utf8'), hostsPrelude, 'the hosts file is untouched');
    }
  });

  test("the lab's layout: agent --render-only and balancer as user nobody on a run dir nobody owns serve; a root-owned run dir is refused naming nobody's uid", async () => {
    const runDir = join(base, 'lab-run');
    await mkdir(runDir, { mode: 0o755 });
    await chown(runDir, nobody, nobody);
    const asNobody = await repoReadableByNobody();
    const server = await backend('lab-web');
    await register('lab-web-1', 'labweb', server);
    const balancer = start(['balancer', '--run-dir', runDir, '--hosts-file', 'off', '--dns', 'off'], { asNobody });
    start(['agent', '--render-only', '--consul', consul.url, '--run-dir', runDir, '--admin', 'off', '--dns', 'off', '--range', '127.92.0.0/16', '--kv-prefix', 'lm-lab'], { asNobody });
    const web = await eventually(() => route(runDir, 'labweb'), 30_000, 'labweb rendered by the agent as nobody');
    assert.equal(await eventually(() => whoAnswers(web.address, web.port, 1000), 20_000, 'labweb served by the balancer as nobody'), 'lab-web');
    for (const f of ['balancer.json', 'hosts', 'addresses.json']) assert.equal((await stat(join(runDir, f))).uid, nobody, `${f} written by nobody`);
    assert.equal(balancer.process.exitCode, null);

    const rootOwned = join(base, 'lab-root-owned');
    await mkdir(rootOwned, { mode: 0o755 });
    const wrong = start(['balancer', '--run-dir', rootOwned, '--hosts-file', 'off', '--dns', 'off'], { asNobody });
    const result = await wrong.process;
    assert.equal(result.exitCode, 2);
    assert.ok(wrong.stderr().includes(`run dir ${rootOwned} is owned by uid 0 with mode 0755; expected owner uid ${nobody}`), wrong.stderr());
    assert.ok(wrong.stderr().includes(`chown ${nobody} ${rootOwned} && chmod 755 ${rootOwned}`), wrong.stderr());
  });

  test('split mode: planted run-dir files are refused and the last good config keeps serving; a deleted-and-recreated or renamed-in run dir is followed', async (t) => {
    const runDir = join(base, 'split');
    const server = await backend('split-web');
    await register('split-web-1', 'splitweb', server);
    const balancer = start(['balancer', '--run-dir', runDir, '--hosts-file', 'off', '--dns', 'off']);
    const agentArgs = ['agent', '--render-only', '--consul', consul.url, '--run-dir', runDir, '--admin', 'off', '--dns', 'off', '--range', '127.93.0.0/16', '--kv-prefix', 'lm-split'];
    let agent = start(agentArgs);
    const web = await eventually(() => route(runDir, 'splitweb'), 30_000, 'splitweb rendered');
    await eventually(() => whoAnswers(web.address, web.port, 1000), 20_000, 'splitweb served');
    const served = async (): Promise<void> => assert.equal(await whoAnswers(web.address, web.port, 2000), 'split-web', 'the last good config still serves');
    const good = await readFile(join(runDir, 'balancer.json'), 'utf8');

    // Planted files, while the agent is stopped (it would render over them): each asks for a listener never bound.
    await stop(agent);
    const evilPort = await freePort('0.0.0.0');
    const evil = JSON.stringify({ version: 1, services: [{ service: 'evil', name: 'evil', fqdn: 'evil.local', address: '0.0.0.0', port: evilPort, backends: [{ id: 'x/evil', address: '10.6.6.6', port: 80 }] }] });
    const evilOnLoopback = evil.replace('"0.0.0.0"', '"127.93.66.66"');
    const elsewhere = join(base, 'elsewhere.json');
    await writeFile(elsewhere, evilOnLoopback);
    const path = join(runDir, 'balancer.json');
    const plants: Array<{ what: string; plant: () => Promise<unknown>; code: string; says: string }> = [
      { what: "another user's file", plant: async () => { await writeFile(path, evilOnLoopback); await chown(path, nobody, nobody); }, code: codes.runDirFile, says: `is owned by uid ${nobody}` },
      { what: 'a world-writable file', plant: async () => { await writeFile(path, evilOnLoopback); await chmod(path, 0o666); }, code: codes.runDirFile, says: 'has mode 0666' },
      { what: 'a symlink to a file elsewhere', plant: () => symlink(elsewhere, path), code: codes.runDirFile, says: `symbolic link to ${elsewhere}` },
      { what: 'a FIFO', plant: () => execa('mkfifo', [path]), code: codes.runDirFile, says: 'named pipe (FIFO)' },
      { what: 'our own file asking for 0.0.0.0', plant: () => writeFile(path, evil, { mode: 0o644 }), code: codes.balancerConfig, says: 'expected a loopback address inside 127.0.0.0/8' },
    ];
    for (const p of plants) {
      await rm(path, { force: true });
      await p.plant();
      await eventually(() => balancer.log.some((l) => l.code === p.code && `${l.err ?? ''}${l.msg ?? ''}`.includes(p.says)), 10_000, `${p.what} refused (${p.code})`).catch((err: Error) => {
        throw new Error(`${err.message}; the balancer's log ends with ${JSON.stringify(balancer.log.slice(-5))}`);
      });
      await served();
      assert.equal(await refused('127.0.0.1', evilPort), true, `${p.what}: nothing listens on 0.0.0.0:${evilPort}`);
      assert.equal(await refused('127.93.66.66', evilPort), true, `${p.what}: nothing of the planted file is bound`);
    }
    await rm(path, { force: true });
    await writeFile(path, good);
    agent = start(agentArgs);

    // Deleted and recreated: the agent renders into the new dir (its next change), the balancer follows.
    await rm(runDir, { recursive: true });
    await mkdir(runDir, { mode: 0o755 });
    const second = await backend('split-second');
    await register('split-second-1', 'splitsecond', second);
    const secondRoute = await eventually(() => route(runDir, 'splitsecond'), 30_000, 'splitsecond rendered into the recreated dir');
    assert.equal(await eventually(() => whoAnswers(secondRoute.address, secondRoute.port, 1000), 15_000, 'splitsecond served after the dir was recreated'), 'split-second');
    await served();

    // Replaced by a rename (a new folder swapped in): followed too.
    await mkdir(`${runDir}.new`, { mode: 0o755 });
    await rename(runDir, `${runDir}.old`);
    await rename(`${runDir}.new`, runDir);
    const third = await backend('split-third');
    await register('split-third-1', 'splitthird', third);
    const thirdRoute = await eventually(() => route(runDir, 'splitthird'), 30_000, 'splitthird rendered into the swapped-in dir');
    assert.equal(await eventually(() => whoAnswers(thirdRoute.address, thirdRoute.port, 1000), 15_000, 'splitthird served after the dir was replaced'), 'split-third');
    assert.equal(await whoAnswers(secondRoute.address, secondRoute.port, 2000), 'split-second');
    await served();
    assert.equal(balancer.process.exitCode, null, 'the balancer never stopped');
    t.diagnostic(balancer.log.filter((l) => /run dir/.test(l.msg ?? '')).map((l) => l.msg).join(' | '));
  });

  test('a full disk under the run dir: renders fail with a clear error, leave no temp file, and succeed once there is space', async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'loopmesh-faults-full-'));
    await writeFile(join(dir, 'hosts'), hostsPrelude);
    const runDir = join(dir, 'run');
    await mkdir(runDir, { mode: 0o755 });
    const mounted = await execa('mount', ['-t', 'tmpfs', '-o', 'size=64k,mode=0755', 'tmpfs', runDir], { reject: false });
    if (mounted.exitCode !== 0) {
      await removeDir(dir);
      return t.skip(`cannot mount a tmpfs here: ${mounted.stderr}`);
    }
    let node: Awaited<ReturnType<typeof startAgent>> | undefined;
    t.after(async () => {
      await node?.stop();
      await execa('umount', [runDir]);
      await removeDir(dir);
    });
    const log = captureLogger('info');
    node = await startAgent(consul.url, { range: '127.94.0.0/16', kvPrefix: 'lm-full', dns: 'off', admin: 'off' }, dir, log.logger);
    const server = await backend('full-web');
    await register('full-web-1', 'fullweb', server);
    const web = await eventually(() => route(runDir, 'fullweb'), 30_000, 'fullweb rendered');
    assert.equal(await eventually(() => whoAnswers(web.address, web.port, 1000), 10_000, 'fullweb served'), 'full-web');

    await writeFile(join(runDir, 'filler'), Buffer.alloc(256 * 1024, 1)).catch((err: NodeJS.ErrnoException) => assert.equal(err.code, 'ENOSPC'));
    // Many services at once, so the render no longer fits.
    const late = await backend('full-late');
    for (let i = 0; i < 40; i += 1) await consul.register({ id: `full-late-${i}`, name: `fulllate${i}`, port: late.port, ttlCheck: { passing: true } });
    await eventually(() => log.lines.some((l) => l.code === codes.renderWrite && /ENOSPC|no space left/.test(l.msg)), 30_000, 'the failed render reported');
    const failure = log.lines.find((l) => l.code === codes.renderWrite)!;
    t.diagnostic(failure.msg);
    assert.ok(failure.msg.includes(runDir), `the message names the file: ${failure.msg}`);
    // Renders are retried meanwhile: a temp file may exist for an instant, but none may stay (each has a new random name).
    const tempFiles = async (): Promise<string[]> => (await readdir(runDir)).filter((f) => f.endsWith('.tmp'));
    const seen = new Set<string>();
    const stayed = new Set<string>();
    for (let i = 0; i < 8; i += 1) {
      for (const f of await tempFiles()) {
        if (seen.has(f)) stayed.add(f);
        seen.add(f);
      }
      await new Promise((r) => setTimeout(r, 400));
    }
    assert.deepEqual([...stayed], [], 'no temp file left by the failed renders');
    assert.equal(await whoAnswers(web.address, web.port, 2000), 'full-web', 'the last good files keep serving');

    await rm(join(runDir, 'filler'));
    const lastLate = await eventually(() => route(runDir, 'fulllate39'), 30_000, 'the render retried once there is space');
    assert.equal(await eventually(() => whoAnswers(lastLate.address, lastLate.port, 1000), 10_000, 'the new services served'), 'full-late');
    await new Promise((r) => setTimeout(r, 1000));
    assert.deepEqual(await tempFiles(), [], 'none after the successful render either');
    for (let i = 0; i < 40; i += 1) await consul.deregister(`full-late-${i}`);
  });
});
