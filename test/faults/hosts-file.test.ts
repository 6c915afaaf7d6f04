import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { chmod, lstat, mkdir, mkdtemp, readdir, readFile, readlink, realpath, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { DataPlane } from '../../agent/data-plane/data-plane.js';
import { beginLine, beginMarker, blockOwners, endMarker, HostsFileError, writeHostsBlock } from '../../agent/dns/hosts-file.js';
import { silentLogger } from '../../agent/log.js';
import { TestConsul } from '../support/consul.js';
import { captureLogger } from '../support/log.js';
import { eventually, freePort, startIdServer, type IdServer } from '../support/net.js';
import { hostsPrelude, removeDir, startAgent } from '../support/agent.js';

/** The hosts file as a boundary (issue 7, finding 5): real files, symbolic links, real processes. */

const repoRoot = fileURLToPath(new URL('../..', import.meta.url));
const owner = '/var/lib/loopmesh-a';

async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-hosts-fault-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function blockOf(text: string): string[] {
  const lines = text.split('\n');
  const start = lines.findIndex((l) => l.startsWith('# BEGIN loopmesh'));
  const end = lines.indexOf(endMarker);
  assert.ok(start >= 0 && end > start, `one block in:\n${text}`);
  return lines.slice(start + 1, end);
}

const temps = (names: string[]): string[] => names.filter((n) => n.includes('.tmp'));

test('a program appending lines while the block is rewritten again and again loses none of them', { timeout: 120_000 }, async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n# kept by the appender test\n');
  const { logger, lines: logged } = captureLogger('info');
  // A real, separate process: bash opens the file for appending on each line, as `echo ... >> /etc/hosts` does.
  const appender = spawn('bash', ['-c', 'for i in $(seq 1 400); do echo "127.9.$((i / 250)).$((i % 250 + 1)) appended-$i.example" >> "$1"; (( i % 4 == 0 )) && sleep 0.01; done; exit 0', 'appender', path], { stdio: 'ignore' });
  const exited = once(appender, 'exit');
  let running = true;
  void exited.then(() => (running = false));
  const blocks = (n: number): string => Array.from({ length: (n % 7) + 1 }, (_, i) => `127.77.${n % 200}.${i + 1} s${i}-${n}.local`).join('\n') + '\n';
  let updates = 0;
  let last = '';
  // At least 200 rewrites, and on while the appender runs, up to a bound.
  while ((updates < 200 || running) && updates < 3000) {
    last = blocks(updates);
    await writeHostsBlock(path, last, { owner, logger });
    updates += 1;
  }
  const [code] = (await exited) as [number | null];
  assert.equal(code, 0, 'the appender finished');
  // Stragglers (an append that opened the old file before a rename) are carried over within 200 ms.
  await sleep(600);
  const text = await readFile(path, 'utf8');
  const appended = text.split('\n').filter((l) => / appended-\d+\.example$/.test(l));
  const missing = Array.from({ length: 400 }, (_, i) => i + 1).filter((i) => !appended.some((l) => l.endsWith(` appended-${i}.example`)));
  assert.deepEqual(missing, [], `lines lost (${missing.length} of 400)`);
  assert.equal(appended.length, 400, 'each appended line exactly once');
  assert.deepEqual(blockOf(text), last.trimEnd().split('\n'), 'the block is the last one written');
  assert.equal(blockOwners(text).length, 1, 'one block');
  assert.ok(text.startsWith('127.0.0.1 localhost\n# kept by the appender test\n'), 'the lines above stay');
  assert.deepEqual(temps(await readdir(dir)), [], 'no temp file left behind');
  const carried = logged.filter((l) => /carried over/.test(l.msg)).length;
  t.diagnostic(`${updates} rewrites while 400 lines were appended; appends carried over from a replaced file ${carried} times`);
});

test('a symbolic link chain is followed: the final file is written, every link stays a link', async (t) => {
  const dir = await tempDir(t);
  // etc/hosts -> ../shared/link (relative) -> <dir>/real/sub-link (absolute, in a folder reached
  // through a symlinked folder) -> ../hosts.real, relative to the real folder of that link.
  await mkdir(join(dir, 'etc'));
  await mkdir(join(dir, 'shared'));
  await mkdir(join(dir, 'real', 'sub'), { recursive: true });
  await symlink(join(dir, 'real', 'sub'), join(dir, 'sublink'));
  const final = join(dir, 'real', 'hosts.real');
  await writeFile(final, '127.0.0.1 localhost\n');
  await chmod(final, 0o640);
  await symlink('../hosts.real', join(dir, 'real', 'sub', 'hosts'));
  await symlink(join(dir, 'sublink', 'hosts'), join(dir, 'shared', 'link'));
  await symlink('../shared/link', join(dir, 'etc', 'hosts'));
  const before = await stat(final);
  const path = join(dir, 'etc', 'hosts');

  assert.equal(await writeHostsBlock(path, '127.77.0.2 web.local\n', { owner }), true);
  assert.equal(await writeHostsBlock(path, '127.77.0.3 db.local\n', { owner }), true);

  for (const [link, target] of [
    [join(dir, 'etc', 'hosts'), '../shared/link'],
    [join(dir, 'shared', 'link'), join(dir, 'sublink', 'hosts')],
    [join(dir, 'real', 'sub', 'hosts'), '../hosts.real'],
  ] as const) {
    assert.ok((await lstat(link)).isSymbolicLink(), `${link} is still a symbolic link`);
    assert.equal(await readlink(link), target, `${link} still points where it did`);
  }
  assert.equal(await readFile(final, 'utf8'), `127.0.0.1 localhost\n${beginLine({ owner, pid: process.pid })}\n127.77.0.3 db.local\n${endMarker}\n`);
  assert.equal((await stat(final)).mode & 0o777, 0o640, 'mode kept');
  assert.notEqual((await stat(final)).ino, before.ino, 'replaced by a rename in its own folder');
  assert.equal(await readFile(path, 'utf8'), await readFile(final, 'utf8'), 'read through the link, the same');
  for (const folder of ['etc', 'shared', 'real', join('real', 'sub')]) assert.deepEqual(temps(await readdir(join(dir, folder))), [], `no temp file in ${folder}`);
});

test('a dangling symbolic link is an error naming the link and its missing target; nothing is created', async (t) => {
  const dir = await tempDir(t);
  const link = join(dir, 'hosts');
  const hop = join(dir, 'hop');
  const missing = join(dir, 'gone', 'hosts');
  await symlink(hop, link);
  await symlink(missing, hop);
  await assert.rejects(writeHostsBlock(link, '127.77.0.2 web.local\n', { owner }), (err: unknown) => {
    assert.ok(err instanceof HostsFileError);
    assert.equal(err.code, 'LM_ERR_HOSTS_WRITE');
    assert.ok(err.message.includes(link) && err.message.includes(missing), err.message);
    assert.match(err.message, /does not exist/);
    return true;
  });
  assert.ok((await lstat(link)).isSymbolicLink(), 'the link stays');
  assert.deepEqual((await readdir(dir)).sort(), ['hop', 'hosts'], 'nothing created');

  await rm(hop);
  await symlink(link, hop);
  await assert.rejects(writeHostsBlock(link, '127.77.0.2 web.local\n', { owner }), /more than 40 symbolic links/, 'a loop of links');
});

/** Another agent: a separate node process that writes the block as `childOwner` and stays alive. */
async function otherAgent(t: TestContext, path: string, childOwner: string): Promise<ChildProcess & { pid: number }> {
  const module = pathToFileURL(join(repoRoot, 'agent', 'dns', 'hosts-file.ts')).href;
  const script = `
    const { writeHostsBlock } = await import(${JSON.stringify(module)});
    await writeHostsBlock(${JSON.stringify(path)}, '127.77.0.9 other.local\\n', { owner: ${JSON.stringify(childOwner)} });
    process.stdout.write('written\\n');
    process.stdin.resume();
  `;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: repoRoot, stdio: ['pipe', 'pipe', 'inherit'] });
  t.after(() => {
    child.kill('SIGKILL');
  });
  const [chunk] = (await once(child.stdout!, 'data')) as [Buffer];
  assert.equal(chunk.toString(), 'written\n');
  assert.ok(child.pid);
  return child as ChildProcess & { pid: number };
}

test('two agents on one hosts file: a running one\'s block is refused (LM_ERR_HOSTS_OWNED), a stopped one\'s is taken over', { timeout: 60_000 }, async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n');
  const other = await otherAgent(t, path, '/srv/agent-b/run');
  const theirs = await readFile(path, 'utf8');
  assert.deepEqual(blockOwners(theirs), [{ owner: '/srv/agent-b/run', pid: other.pid }]);

  await assert.rejects(writeHostsBlock(path, '127.77.0.2 web.local\n', { owner }), (err: unknown) => {
    assert.ok(err instanceof HostsFileError);
    assert.equal(err.code, 'LM_ERR_HOSTS_OWNED');
    for (const part of ['/srv/agent-b/run', `pid ${other.pid}`, owner, path, '--hosts-file']) assert.ok(err.message.includes(part), `names ${part}: ${err.message}`);
    return true;
  });
  assert.equal(await readFile(path, 'utf8'), theirs, 'their block left alone');

  other.kill('SIGKILL');
  await once(other, 'exit');
  const { logger, lines } = captureLogger('info');
  assert.equal(await writeHostsBlock(path, '127.77.0.2 web.local\n', { owner, logger }), true);
  const text = await readFile(path, 'utf8');
  assert.equal(text, `127.0.0.1 localhost\n${beginLine({ owner, pid: process.pid })}\n127.77.0.2 web.local\n${endMarker}\n`);
  assert.ok(lines.some((l) => l.level === 30 && l.msg.includes('took over') && l.msg.includes('/srv/agent-b/run') && l.msg.includes(`pid ${other.pid}, no longer running`)), 'an info line says whose block was taken over');
});

test('the same owner in another process (a hot-restart successor) is the same agent; a block with no owner (older loopmesh) is taken over', { timeout: 60_000 }, async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '# top\n');
  const predecessor = await otherAgent(t, path, owner);
  assert.equal(await writeHostsBlock(path, '127.77.0.2 web.local\n', { owner }), true, 'written while the predecessor still runs');
  assert.deepEqual(blockOwners(await readFile(path, 'utf8')), [{ owner, pid: process.pid }]);
  predecessor.kill('SIGKILL');

  const old = join(dir, 'old-hosts');
  await writeFile(old, `# top\n${beginMarker}\n127.77.0.1 old.local\n${endMarker}\n# bottom\n`);
  const { logger, lines } = captureLogger('info');
  assert.equal(await writeHostsBlock(old, '127.77.0.2 web.local\n', { owner, logger }), true);
  assert.equal(await readFile(old, 'utf8'), `# top\n${beginLine({ owner, pid: process.pid })}\n127.77.0.2 web.local\n${endMarker}\n# bottom\n`);
  assert.ok(lines.some((l) => l.msg.includes('took over') && l.msg.includes('no owner')), 'an info line says an unowned block was taken over');
});

async function balancerJson(runDir: string, version: number): Promise<void> {
  // An empty config: the data plane loads it and syncs the hosts block, no listener needed. `version`
  // changes the bytes, so that the file source applies it again.
  await writeFile(join(runDir, 'balancer.json'), `${JSON.stringify({ version: 1, services: [] })}${' '.repeat(version)}\n`);
}

test('lines of the run dir\'s hosts file that are not loopback entries never reach the hosts file; each is reported once', { timeout: 60_000 }, async (t) => {
  const dir = await tempDir(t);
  const realRun = join(dir, 'run-real');
  await mkdir(realRun, { mode: 0o700 });
  const runDir = join(dir, 'run');
  await symlink(realRun, runDir);
  const target = join(dir, 'hosts');
  await writeFile(target, '127.0.0.1 localhost\n');
  const bad = ['0.0.0.0 web.local', '10.9.9.9 evil.local', '127.77.0.4 github.com', '127.77.0.5 ok.local\r127.0.0.1 x.local', '# END loopmesh', 'ssh-rsa AAAA attacker'];
  await writeFile(join(realRun, 'hosts'), ['# rendered', '127.77.0.2 web.local', ...bad, '127.77.0.3 db.local', ''].join('\n'));
  await balancerJson(realRun, 0);
  const { logger, lines } = captureLogger('info');
  const plane = new DataPlane({ runDir, logger, suffix: 'local', dns: undefined, hostsFile: target, connectTimeoutMs: 1000, drainTimeoutMs: 1000 });
  t.after(() => plane.close());
  await plane.start();

  const text = await readFile(target, 'utf8');
  assert.equal(text, `127.0.0.1 localhost\n${beginLine({ owner: await realpath(runDir), pid: process.pid })}\n# rendered\n127.77.0.2 web.local\n127.77.0.3 db.local\n${endMarker}\n`, 'only the valid lines, owned by the real run dir');
  const problems = plane.hostsProblems();
  assert.equal(problems.length, bad.length);
  for (const [i, line] of bad.entries()) {
    assert.equal(problems[i]?.code, 'LM_ERR_HOSTS_INVALID_LINE');
    assert.ok(problems[i]?.message.includes(JSON.stringify(line)), `names ${JSON.stringify(line)}: ${problems[i]?.message}`);
  }
  const warned = (): number => lines.filter((l) => l.code === 'LM_ERR_HOSTS_INVALID_LINE').length;
  assert.equal(warned(), bad.length);

  await plane.reload();
  assert.equal(warned(), bad.length, 'the same lines are not logged again');
  await writeFile(join(realRun, 'hosts'), ['127.77.0.2 web.local', ...bad, '1.2.3.4 new.local', ''].join('\n'));
  await plane.reload();
  assert.equal(warned(), bad.length + 1, 'a new bad line is logged once');
  assert.deepEqual(blockOf(await readFile(target, 'utf8')), ['127.77.0.2 web.local']);

  // Another agent, running (this very process), owns the block: refused, reported, left alone.
  const theirs = `127.0.0.1 localhost\n${beginLine({ owner: '/srv/other/run', pid: process.pid })}\n127.77.0.8 theirs.local\n${endMarker}\n`;
  await writeFile(target, theirs);
  await writeFile(join(realRun, 'hosts'), '127.77.0.2 web.local\n');
  await plane.reload();
  assert.equal(await readFile(target, 'utf8'), theirs);
  const owned = plane.hostsProblems();
  assert.equal(owned.length, 1);
  assert.equal(owned[0]?.code, 'LM_ERR_HOSTS_OWNED');
  assert.match(owned[0]?.message ?? '', /\/srv\/other\/run/);
  await plane.reload();
  assert.equal(lines.filter((l) => l.code === 'LM_ERR_HOSTS_OWNED').length, 1, 'logged once while it lasts');

  // The other agent's block gone: this one writes again and the problem clears.
  await writeFile(target, '127.0.0.1 localhost\n');
  await plane.reload();
  assert.deepEqual(plane.hostsProblems(), []);
  assert.deepEqual(blockOf(await readFile(target, 'utf8')), ['127.77.0.2 web.local']);
});

describe('faults: a template that renders a bad hosts line, with a real Consul and agent', { timeout: 120_000 }, () => {
  let consul: TestConsul;
  let backend: IdServer;
  const dirs: string[] = [];

  before(async () => {
    consul = await TestConsul.start();
    backend = await startIdServer('web-backend');
  });

  after(async () => {
    await backend?.close();
    await consul?.close();
    await Promise.all(dirs.map(removeDir));
  });

  test('the bad line is dropped and reported; the service is published and served as before', async () => {
    const templates = await mkdtemp(join(tmpdir(), 'loopmesh-templates-'));
    dirs.push(templates);
    await writeFile(join(templates, 'hosts.hbs'), '{{#each routes}}\n{{address}} {{fqdn}}\n0.0.0.0 {{fqdn}}\n{{/each}}\n');
    const port = await freePort();
    await consul.register({ id: 'web-1', name: 'web', port: backend.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
    const node = await startAgent(consul.url, { templates }, undefined, silentLogger());
    dirs.push(node.dir);
    try {
      const plane = node.agent.dataPlane!;
      const address = await eventually(() => plane.balancer.snapshot().find((s) => s.service === 'web' && s.listening)?.address, 20_000, 'web served');
      const text = await eventually(async () => {
        const t = await readFile(node.config.hostsFile!, 'utf8');
        return t.includes(`${address} web.local`) ? t : undefined;
      }, 20_000, 'web.local in the hosts file');
      assert.ok(text.startsWith(hostsPrelude), 'the lines above the block stay');
      assert.deepEqual(blockOf(text), [`${address} web.local`], 'no 0.0.0.0 line');
      const problems = plane.hostsProblems();
      assert.equal(problems.length, 1);
      assert.equal(problems[0]?.code, 'LM_ERR_HOSTS_INVALID_LINE');
      assert.match(problems[0]?.message ?? '', /"0\.0\.0\.0 web\.local"/);
    } finally {
      await node.stop();
    }
  });
});
