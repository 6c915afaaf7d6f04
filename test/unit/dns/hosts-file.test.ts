import { repoReadableByNobody } from '../../support/nobody.js';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, chown, cp, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beginLine, beginMarker, blockOwners, checkHostsLines, endMarker, HostsFileError, parseBlockOwner, removeHostsBlock, spliceHostsBlock, writeHostsBlock } from '../../../agent/dns/hosts-file.js';

const run = promisify(execFile);
const lines = '127.77.0.2 web.local\n127.77.0.3 redis.local\n';
const block = `${beginMarker}\n127.77.0.2 web.local\n127.77.0.3 redis.local\n${endMarker}\n`;
/** The owner a write names on the block: an agent's run dir. */
const owner = '/var/lib/loopmesh';
const ownedBegin = beginLine({ owner, pid: process.pid });
const ownedBlock = block.replace(beginMarker, ownedBegin);
const ownedCrlfBlock = ownedBlock.replace(/\n/g, '\r\n');
const crlfBlock = block.replace(/\n/g, '\r\n');

const spliceCases: Array<{ what: string; original: string; expected: string }> = [
  { what: 'an empty file gets the block', original: '', expected: block },
  { what: 'appended after a final newline', original: '127.0.0.1\tlocalhost\n\n# keep me\n', expected: `127.0.0.1\tlocalhost\n\n# keep me\n${block}` },
  { what: 'a newline is added before the block when the file lacks one', original: '127.0.0.1 localhost', expected: `127.0.0.1 localhost\n${block}` },
  { what: 'a CRLF file keeps its bytes and gets a CRLF block', original: '127.0.0.1 localhost\r\n# c\r\n', expected: `127.0.0.1 localhost\r\n# c\r\n${crlfBlock}` },
  {
    what: 'an existing block is replaced in place; the lines around it stay',
    original: `# top\r\n\r\n${beginMarker}\n10.0.0.1 old.local\n${endMarker}\n  # after, indented\n::1 ip6-localhost`,
    expected: `# top\r\n\r\n${crlfBlock}  # after, indented\n::1 ip6-localhost`,
  },
  { what: 'a block with an older BEGIN text and no final newline is replaced', original: `a\n# BEGIN loopmesh\nold\n${endMarker}`, expected: `a\n${block}` },
  { what: 'a second block is removed', original: `${beginMarker}\nx\n${endMarker}\nmid\n${beginMarker}\ny\n${endMarker}\nend\n`, expected: `${block}mid\nend\n` },
  {
    what: 'a stray END above and a BEGIN with no END are left alone',
    original: `${endMarker}\nkeep 1\n# BEGIN loopmesh\nkeep 2\n`,
    expected: `${endMarker}\nkeep 1\n# BEGIN loopmesh\nkeep 2\n${block}`,
  },
];

for (const c of spliceCases) {
  test(`spliceHostsBlock: ${c.what}`, () => {
    const once = spliceHostsBlock(c.original, lines);
    assert.equal(once, c.expected);
    assert.equal(spliceHostsBlock(once, lines), once, 'idempotent');
  });
}

test('spliceHostsBlock: marker lines inside the content are dropped, so the block cannot be split', () => {
  assert.equal(spliceHostsBlock('', `1.2.3.4 a.local\n${endMarker}\n# BEGIN loopmesh\n`), `${beginMarker}\n1.2.3.4 a.local\n${endMarker}\n`);
});

test('removeHostsBlock: takes out the block, markers included, and nothing else', () => {
  const original = `a\r\n${beginMarker}\r\nx\r\n${endMarker}\r\nb`;
  assert.equal(removeHostsBlock(original), 'a\r\nb');
  assert.equal(removeHostsBlock(spliceHostsBlock('a\nb\n', lines)), 'a\nb\n');
  assert.equal(removeHostsBlock('no block here'), 'no block here');
});

const ownerCases: Array<{ what: string; line: string; expected: { owner: string; pid: number } | undefined }> = [
  { what: 'the marker a write makes', line: beginLine({ owner: '/var/lib/loopmesh', pid: 4242 }), expected: { owner: '/var/lib/loopmesh', pid: 4242 } },
  { what: 'a path with spaces, quotes and a newline reads back exactly', line: beginLine({ owner: '/srv/my "run"\ndir', pid: 7 }), expected: { owner: '/srv/my "run"\ndir', pid: 7 } },
  { what: 'a CRLF line end', line: `${beginLine({ owner: '/r', pid: 9 })}\r`, expected: { owner: '/r', pid: 9 } },
  { what: 'an older marker with no owner', line: beginMarker, expected: undefined },
  { what: 'the shortest older marker', line: '# BEGIN loopmesh', expected: undefined },
  { what: 'pid 0 (would probe a process group)', line: `${beginMarker} owner="/r" pid=0`, expected: undefined },
  { what: 'no pid', line: `${beginMarker} owner="/r"`, expected: undefined },
  { what: 'an empty owner', line: `${beginMarker} owner="" pid=5`, expected: undefined },
  { what: 'an owner that is not a JSON string', line: `${beginMarker} owner=/r pid=5`, expected: undefined },
  { what: 'not a BEGIN line', line: `# BEGIN other owner="/r" pid=5`, expected: undefined },
];

for (const c of ownerCases) {
  test(`parseBlockOwner: ${c.what}`, () => {
    assert.deepEqual(parseBlockOwner(c.line), c.expected);
  });
}

test('spliceHostsBlock with an owner: the BEGIN line names it, keeps the "# BEGIN loopmesh" prefix scripts grep for, and replaces an older marker', () => {
  const mine = { owner: '/var/lib/loopmesh', pid: 31 };
  const spliced = spliceHostsBlock(`a\n# BEGIN loopmesh\nold\n${endMarker}\nb\n`, lines, mine);
  assert.equal(spliced, `a\n${beginLine(mine)}\n127.77.0.2 web.local\n127.77.0.3 redis.local\n${endMarker}\nb\n`);
  assert.match(spliced, /^# BEGIN loopmesh /m);
  assert.deepEqual(blockOwners(spliced), [mine]);
  const successor = spliceHostsBlock(spliced, lines, { ...mine, pid: 32 });
  assert.deepEqual(blockOwners(successor), [{ ...mine, pid: 32 }], 'a hot-restart successor rewrites only the pid');
});

test('removeHostsBlock with an owner: takes out only that owner\'s block; without one, every block, old markers and new', () => {
  const a = beginLine({ owner: '/a', pid: 1 });
  const b = beginLine({ owner: '/b', pid: 2 });
  const text = `x\n${a}\n1\n${endMarker}\ny\n${b}\n2\n${endMarker}\n# BEGIN loopmesh\n3\n${endMarker}\nz\n`;
  assert.equal(removeHostsBlock(text, { owner: '/a' }), `x\ny\n${b}\n2\n${endMarker}\n# BEGIN loopmesh\n3\n${endMarker}\nz\n`);
  assert.equal(removeHostsBlock(text, { owner: '/nobody' }), text);
  assert.equal(removeHostsBlock(text), 'x\ny\nz\n');
});

const suffix = 'local';
const lineCases: Array<{ what: string; line: string; kept: boolean; reason?: RegExp }> = [
  { what: 'an entry', line: '127.77.0.2 web.local', kept: true },
  { what: 'several names, tabs, indent, upper case', line: '  127.77.0.2\tWeb.local  api.web.local ', kept: true },
  { what: 'the top of 127/8', line: '127.255.255.255 a.local', kept: true },
  { what: 'a 63-character label', line: `127.1.0.1 ${'a'.repeat(63)}.local`, kept: true },
  { what: 'a comment', line: '# routes rendered by loopmesh', kept: true },
  { what: 'a blank line', line: ' \t', kept: true },
  { what: 'an address outside 127/8', line: '0.0.0.0 web.local', kept: false, reason: /address "0\.0\.0\.0" is outside 127\.0\.0\.0\/8 and not a gateway of web\.local/ },
  { what: 'an off-host address', line: '10.1.2.3 web.local', kept: false, reason: /address "10\.1\.2\.3"/ },
  { what: 'IPv6 loopback', line: '::1 web.local', kept: false, reason: /address "::1"/ },
  { what: 'an octet over 255', line: '127.0.0.256 web.local', kept: false, reason: /address "127\.0\.0\.256"/ },
  { what: 'a leading zero (read as octal by the resolver)', line: '127.0.0.010 web.local', kept: false, reason: /address "127\.0\.0\.010"/ },
  { what: 'a short form', line: '127.1 web.local', kept: false, reason: /address "127\.1"/ },
  { what: 'no name', line: '127.77.0.2', kept: false, reason: /no name/ },
  { what: 'a name outside the suffix (would take over another name)', line: '127.77.0.2 github.com', kept: false, reason: /name "github\.com" is not under \.local/ },
  { what: 'the bare suffix', line: '127.77.0.2 local', kept: false, reason: /name "local" is not under \.local/ },
  { what: 'an underscore', line: '127.77.0.2 my_app.local', kept: false, reason: /name "my_app\.local" is not a DNS host name/ },
  { what: 'a label of 64 characters', line: `127.77.0.2 ${'a'.repeat(64)}.local`, kept: false, reason: /is not a DNS host name/ },
  { what: 'a name over 253 characters', line: `127.77.0.2 ${Array.from({ length: 5 }, () => 'a'.repeat(60)).join('.')}.local`, kept: false, reason: /is not a DNS host name/ },
  { what: 'an empty label', line: '127.77.0.2 web..local', kept: false, reason: /is not a DNS host name/ },
  { what: 'a leading hyphen', line: '127.77.0.2 -web.local', kept: false, reason: /is not a DNS host name/ },
  { what: 'a trailing comment', line: '127.77.0.2 web.local # hi', kept: false, reason: /name "#" is not a DNS host name/ },
  { what: 'a BEGIN marker', line: '# BEGIN loopmesh', kept: false, reason: /marker line/ },
  { what: 'an END marker', line: endMarker, kept: false, reason: /marker line/ },
  { what: 'a carriage return inside', line: '127.77.0.2 web.local\r127.0.0.1 x.local', kept: false, reason: /control character/ },
  { what: 'a NUL', line: '# a\u0000b', kept: false, reason: /control character/ },
];

for (const c of lineCases) {
  test(`checkHostsLines: ${c.what} is ${c.kept ? 'kept' : 'dropped'}`, () => {
    const checked = checkHostsLines(`${c.line}\n`, { suffix });
    if (c.kept) {
      assert.equal(checked.text, `${c.line}\n`);
      assert.deepEqual(checked.dropped, []);
      return;
    }
    assert.equal(checked.text, '');
    assert.equal(checked.dropped.length, 1);
    const [{ line, problem } = { line: '', problem: { code: '', message: '' } }] = checked.dropped;
    assert.equal(line, c.line);
    assert.equal(problem.code, 'LM_ERR_HOSTS_INVALID_LINE');
    const shown = c.line.length > 200 ? `${c.line.slice(0, 200)}...` : c.line;
    assert.ok(problem.message.includes(JSON.stringify(shown)), `names the line, escaped (clipped past 200 characters): ${problem.message}`);
    assert.match(problem.message, /line 1: /);
    assert.match(problem.message, c.reason ?? /./);
    assert.match(problem.message, /expected a comment, a blank line or "ADDRESS NAME \[NAME\.\.\.\]" with ADDRESS an IPv4 address inside 127\.0\.0\.0\/8/);
  });
}

test('checkHostsLines: a gateway line passes only after the name\'s loopback line and only with a gateway address the served config gives that name', () => {
  const gateways = new Map([['web.local', new Set(['10.77.77.129', '10.77.77.161'])]]);
  const rendered = [
    '10.77.77.161 web.local', // before the loopback line: the local data plane must be tried first
    '127.77.0.1 web.local',
    '10.77.77.129 web.local',
    '10.77.77.161 WEB.local',
    '10.77.77.130 web.local', // not one of web's gateways
    '127.77.0.2 db.local',
    '10.77.77.129 db.local', // db has no gateways in the config
    '10.77.77.129 web.local db.local', // one name of the line is not allowed: the whole line goes
  ].join('\n');
  const checked = checkHostsLines(rendered, { suffix, gateways });
  assert.equal(checked.text, '127.77.0.1 web.local\n10.77.77.129 web.local\n10.77.77.161 WEB.local\n127.77.0.2 db.local\n');
  assert.deepEqual(checked.dropped.map((d) => d.line), ['10.77.77.161 web.local', '10.77.77.130 web.local', '10.77.77.129 db.local', '10.77.77.129 web.local db.local']);
  assert.match(checked.dropped[0]?.problem.message ?? '', /gateway address 10\.77\.77\.161 comes before the loopback line of web\.local/);
  assert.match(checked.dropped[1]?.problem.message ?? '', /"10\.77\.77\.130" is outside 127\.0\.0\.0\/8 and not a gateway of web\.local/);
  // Without a served config, nothing but loopback passes.
  assert.equal(checkHostsLines('127.77.0.1 web.local\n10.77.77.129 web.local\n', { suffix }).text, '127.77.0.1 web.local\n');
});

test('checkHostsLines: keeps the good lines in order around the bad ones, names each bad one by its line number; CRLF lines are read as lines', () => {
  const rendered = '# head\r\n127.77.0.2 web.local\r\n0.0.0.0 evil.local\n\n127.77.0.3 redis.local\n# END loopmesh\n10.0.0.1 db.local';
  const checked = checkHostsLines(rendered, { suffix });
  assert.equal(checked.text, '# head\n127.77.0.2 web.local\n\n127.77.0.3 redis.local\n');
  assert.deepEqual(checked.dropped.map((d) => [d.line, /line (\d+):/.exec(d.problem.message)?.[1]]), [['0.0.0.0 evil.local', '3'], [endMarker, '6'], ['10.0.0.1 db.local', '7']]);
});

test('checkHostsLines: without a suffix any host name passes; a megabyte line is named clipped', () => {
  assert.equal(checkHostsLines('127.77.0.2 web.example.com\n').text, '127.77.0.2 web.example.com\n');
  const huge = `0.0.0.0 ${'a'.repeat(1_000_000)}`;
  const [dropped] = checkHostsLines(huge).dropped;
  assert.ok(dropped && dropped.problem.message.length < 1000, 'message clipped');
  assert.equal(checkHostsLines('').text, '');
});

async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'loopmesh-hosts-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test('writeHostsBlock: keeps every byte outside the block, also bytes that are not UTF-8; a second write changes nothing', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  const before = Buffer.concat([Buffer.from('127.0.0.1 localhost\r\n# caf'), Buffer.from([0xe9, 0xff]), Buffer.from('\n\n::1 ip6-localhost')]);
  await writeFile(path, before);
  assert.equal(await writeHostsBlock(path, lines, { owner }), true);
  const written = await readFile(path);
  assert.deepEqual(written.subarray(0, before.length), before, 'everything before the block, byte for byte');
  assert.equal(written.subarray(before.length).toString('latin1'), `\r\n${ownedCrlfBlock}`);
  const first = await stat(path);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(await writeHostsBlock(path, lines, { owner }), false);
  const second = await stat(path);
  assert.deepEqual([second.mtimeMs, second.ino], [first.mtimeMs, first.ino], 'not rewritten');
  assert.deepEqual(await readFile(path), written);
  assert.deepEqual(await readdir(dir), ['hosts'], 'no temp file left behind');
});

test('writeHostsBlock: replaces the block of an earlier write; the rest stays', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '# head\n');
  await writeHostsBlock(path, lines, { owner });
  await writeFile(path, `${await readFile(path, 'utf8')}# tail\n`);
  assert.equal(await writeHostsBlock(path, '127.77.0.9 db.local\n', { owner }), true);
  assert.equal(await readFile(path, 'utf8'), `# head\n${ownedBegin}\n127.77.0.9 db.local\n${endMarker}\n# tail\n`);
});

test('writeHostsBlock: a missing file is created with mode 644', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  assert.equal(await writeHostsBlock(path, lines, { owner }), true);
  assert.equal(await readFile(path, 'utf8'), ownedBlock);
  assert.equal((await stat(path)).mode & 0o777, 0o644);
});

test('writeHostsBlock: keeps the file mode, and the owner when running as root', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, 'x\n');
  await chmod(path, 0o640);
  const root = process.getuid?.() === 0;
  if (root) await chown(path, 4242, 4343);
  assert.equal(await writeHostsBlock(path, lines, { owner }), true);
  const info = await stat(path);
  assert.equal(info.mode & 0o7777, 0o640);
  if (!root) return t.skip('not root: owner check skipped (mode checked)');
  assert.deepEqual([info.uid, info.gid], [4242, 4343]);
});

test('writeHostsBlock: concurrent writes to one file run one after the other', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, 'keep\n');
  const results = await Promise.all(['1.1.1.1 a.local\n', '2.2.2.2 b.local\n', '2.2.2.2 b.local\n'].map((l) => writeHostsBlock(path, l, { owner })));
  assert.deepEqual(results, [true, true, false]);
  assert.equal(await readFile(path, 'utf8'), `keep\n${ownedBegin}\n2.2.2.2 b.local\n${endMarker}\n`);
});

test('writeHostsBlock: a failure is a HostsFileError LM_ERR_HOSTS_WRITE naming the path', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'no-such-dir', 'hosts');
  await assert.rejects(writeHostsBlock(path, lines, { owner }), (err: unknown) => {
    assert.ok(err instanceof HostsFileError);
    assert.equal(err.code, 'LM_ERR_HOSTS_WRITE');
    assert.ok(err.message.includes(path), err.message);
    return true;
  });
});

async function canUnshare(): Promise<boolean> {
  return run('unshare', ['--mount', 'true']).then(
    () => true,
    () => false,
  );
}

test('a real resolver lookup (getent, /etc/hosts bind-mounted in a private mount namespace) finds the block', async (t) => {
  if (!(await canUnshare())) return t.skip('cannot create a mount namespace here (needs root and unshare): getent check skipped');
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n');
  await writeHostsBlock(path, '127.77.0.2 web.local\n', { owner });
  const { stdout } = await run('unshare', ['--mount', 'sh', '-c', `mount --bind "${path}" /etc/hosts && getent hosts web.local`]);
  assert.deepEqual(stdout.trim().split(/\s+/), ['127.77.0.2', 'web.local']);
});

test('a bind-mounted hosts file (rename fails with EBUSY) is rewritten in place, with one warning', async (t) => {
  if (!(await canUnshare())) return t.skip('cannot create a mount namespace here (needs root and unshare): bind-mount fallback check skipped');
  const dir = await tempDir(t);
  const source = join(dir, 'source');
  const target = join(dir, 'target');
  await writeFile(source, '# original\n');
  await chmod(source, 0o604);
  await writeFile(target, '');
  const module = new URL('../../../agent/dns/hosts-file.ts', import.meta.url).href;
  const script = `
    const { writeHostsBlock } = await import(${JSON.stringify(module)});
    const warnings = [];
    const logger = { warn: (fields, message) => warnings.push({ code: fields.code, message }) };
    const first = await writeHostsBlock(${JSON.stringify(target)}, '127.77.0.2 web.local\\n', { logger, owner: ${JSON.stringify(owner)} });
    const second = await writeHostsBlock(${JSON.stringify(target)}, '127.77.0.3 web.local\\n', { logger, owner: ${JSON.stringify(owner)} });
    process.stdout.write(JSON.stringify({ first, second, warnings, pid: process.pid }));
  `;
  const child = await run('unshare', ['--mount', 'sh', '-c', `mount --bind "${source}" "${target}" && exec "${process.execPath}" --import tsx --input-type=module -e '${script.replace(/'/g, `'\\''`)}'`], { cwd: new URL('../../..', import.meta.url).pathname });
  const result = JSON.parse(child.stdout) as { first: boolean; second: boolean; warnings: Array<{ code: string; message: string }>; pid: number };
  assert.deepEqual([result.first, result.second], [true, true]);
  assert.equal(result.warnings.length, 1, 'warned once');
  assert.equal(result.warnings[0]?.code, 'EBUSY');
  assert.match(result.warnings[0]?.message ?? '', /bind-mounted/);
  assert.equal(await readFile(source, 'utf8'), `# original\n${beginLine({ owner, pid: result.pid })}\n127.77.0.3 web.local\n${endMarker}\n`, 'written through the mount, in place');
  assert.equal((await stat(source)).mode & 0o777, 0o604);
  assert.deepEqual((await readdir(dir)).sort(), ['source', 'target'], 'no temp file left behind');
});

interface ChildWrite {
  changed: boolean;
  uid: number;
  pid: number;
  warnings: Array<{ code: string; message: string }>;
}

/** Runs writeHostsBlock in a child started through `wrapper` (setpriv, unshare...), the way a unit would start the agent. */
async function writeInChild(wrapper: string[], path: string, home: string, root = repoRoot): Promise<ChildWrite> {
  const module = pathToFileURL(join(root, 'agent', 'dns', 'hosts-file.ts')).href;
  const script = `
    const { writeHostsBlock } = await import(${JSON.stringify(module)});
    const warnings = [];
    const logger = { warn: (fields, message) => warnings.push({ code: fields.code, message }) };
    const changed = await writeHostsBlock(${JSON.stringify(path)}, '127.77.0.2 web.local\\n', { logger, owner: ${JSON.stringify(owner)} });
    process.stdout.write(JSON.stringify({ changed, warnings, uid: process.getuid(), pid: process.pid }));
  `;
  const [command = '', ...args] = wrapper;
  const child = await run(command, [...args, process.execPath, '--import', 'tsx', '--input-type=module', '-e', script], {
    cwd: root,
    env: { ...process.env, HOME: home },
  });
  return JSON.parse(child.stdout) as ChildWrite;
}

const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));

/** The code as user nobody can read it (a clone in a private folder gets a readable copy). */
async function readableByNobody(t: TestContext): Promise<string> {
  const root = await repoReadableByNobody();
  if (root !== repoRoot) t.diagnostic(`the repository is not readable by nobody; the child runs from a copy in ${root}`);
  return root;
}

const expectedAfterChild = (pid: number): string => `127.0.0.1 localhost\n# mine\n${beginLine({ owner, pid })}\n127.77.0.2 web.local\n${endMarker}\n`;

test('an unprivileged agent with write access to the file but not its folder rewrites it in place (EACCES)', async (t) => {
  if (process.getuid?.() !== 0) return t.skip('needs root to run a child as another user (setpriv): unprivileged fallback check skipped');
  const dir = await tempDir(t);
  await chmod(dir, 0o755);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n# mine\n');
  await chown(path, 65534, 65534);
  const before = await stat(path);
  const result = await writeInChild(['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'], path, dir, await readableByNobody(t));
  assert.equal(result.uid, 65534);
  assert.equal(result.changed, true);
  assert.equal(result.warnings[0]?.code, 'EACCES');
  assert.match(result.warnings[0]?.message ?? '', /not writable for this user/);
  assert.equal(await readFile(path, 'utf8'), expectedAfterChild(result.pid));
  assert.equal((await stat(path)).ino, before.ino, 'the same file, not a new one');
  assert.deepEqual(await readdir(dir), ['hosts'], 'no temp file left behind');
});

test('a file bind-mounted writable in a read-only folder (ProtectSystem=strict + ReadWritePaths) is rewritten in place (EROFS)', async (t) => {
  if (process.getuid?.() !== 0) return t.skip('needs root for a private mount namespace (unshare --mount): read-only folder check skipped');
  const dir = await tempDir(t);
  const path = join(dir, 'hosts');
  await writeFile(path, '127.0.0.1 localhost\n# mine\n');
  // In a private mount namespace: the folder read-only, the file a writable bind mount on top, as
  // systemd sets up /etc and /etc/hosts for the Vagrant lab's balancer unit.
  const mounts = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && mount --bind "$1/hosts" "$1/hosts" && mount -o remount,bind,rw "$1/hosts" && shift && exec "$@"';
  const result = await writeInChild(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', mounts, 'sh', dir], path, dir);
  assert.equal(result.changed, true);
  assert.equal(result.warnings[0]?.code, 'EROFS');
  assert.match(result.warnings[0]?.message ?? '', /read-only mount/);
  assert.equal(await readFile(path, 'utf8'), expectedAfterChild(result.pid));
  assert.deepEqual(await readdir(dir), ['hosts'], 'no temp file left behind');
});

test('lines checked before are not checked again, and the answer is the same: gateway lines still follow their loopback line, another suffix is checked anew', () => {
  const gateways = new Map([['web.local', new Set(['10.77.77.129'])]]);
  const text = '127.77.0.2 web.local\n10.77.77.129 web.local\n127.77.0.3 db.local\n';
  const first = checkHostsLines(text, { suffix: 'local', gateways });
  const again = checkHostsLines(text, { suffix: 'local', gateways });
  assert.deepEqual(again, first);
  assert.equal(again.text, text, 'the gateway line is kept after its (remembered) loopback line');
  // The gateway line before its loopback line is dropped, remembered lines or not.
  const early = checkHostsLines('10.77.77.129 web.local\n127.77.0.2 web.local\n', { suffix: 'local', gateways });
  assert.equal(early.text, '127.77.0.2 web.local\n');
  assert.equal(early.dropped.length, 1);
  // A line good under .local is not good under another suffix.
  const other = checkHostsLines('127.77.0.2 web.local\n', { suffix: 'mesh' });
  assert.equal(other.text, '');
  assert.match(other.dropped[0]?.problem.message ?? '', /not under \.mesh/);
});
