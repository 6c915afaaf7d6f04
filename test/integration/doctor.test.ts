import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { TestConsul } from '../support/consul.js';
import { eventually, freePort, startIdServer, type IdServer } from '../support/net.js';
import { canUnshare } from '../support/resolve.js';
import { hostsPrelude, removeDir, startAgent } from '../support/agent.js';
import type { Agent } from '../../agent/agent.js';

/**
 * `loopmesh doctor` on a node set up wrong on purpose: each run is in its own mount namespace
 * (unshare --mount --propagation private) with its own /etc/hosts and /etc/nsswitch.conf bound over
 * the real ones, against a real Consul and a real agent (the agent itself runs outside, untouched).
 */

const root = join(import.meta.dirname, '..', '..');

function route(agent: Agent, service: string) {
  return agent.dataPlane!.config()?.services.find((s) => s.service === service);
}

const avahiConf = `[server]
use-ipv4=yes
use-ipv6=no
enable-dbus=no
allow-interfaces=lo
[publish]
disable-publishing=yes
`;

const goodNss = 'passwd: files\ngroup: files\nhosts: files dns\n';

const sh = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

describe('loopmesh doctor on a node set up wrong on purpose', { timeout: 90_000 }, () => {
  let unshare = false;
  let avahi = false;
  let consul: TestConsul;
  let aclConsul: TestConsul | undefined;
  let web: IdServer;
  let node: Awaited<ReturnType<typeof startAgent>>;
  let work: string;
  let webPort: number;
  let squatter: ResultPromise | undefined;
  /** (a), (b) and (c) change nothing outside their namespace: started together in before(), to keep the file fast. */
  const runs: Record<'right' | 'mdns' | 'noblock', Promise<{ exitCode: number; stdout: string; ms: number }> | undefined> = { right: undefined, mdns: undefined, noblock: undefined };

  before(async () => {
    unshare = await canUnshare();
    avahi = (await execa('sh', ['-c', 'command -v avahi-daemon'], { reject: false })).exitCode === 0;
    if (!unshare) return;
    work = await mkdtemp(join(tmpdir(), 'loopmesh-doctor-'));
    consul = await TestConsul.start();
    web = await startIdServer('web-a');
    webPort = await freePort();
    await consul.register({ id: 'web-a', name: 'web', port: web.port, meta: { 'loopmesh-port': String(webPort) }, ttlCheck: { passing: true } });
    node = await startAgent(consul.url);
    await eventually(() => route(node.agent, 'web')?.backends.length === 1, 10_000, 'web routed');
    await eventually(async () => /web\.local/.test(await readFile(node.config.hostsFile!, 'utf8')), 5000, 'web.local in the hosts block');
    const hosts = await readFile(node.config.hostsFile!, 'utf8');
    runs.right = doctor('right', { hosts, nsswitch: goodNss });
    if (avahi) runs.mdns = doctor('mdns', { hosts, nsswitch: 'hosts: mdns4_minimal [NOTFOUND=return] files\n', avahi: true });
    runs.noblock = doctor('noblock', { hosts: hostsPrelude, nsswitch: goodNss });
    // Settled here, so that a failure in one is reported by its own test, never as an unhandled rejection.
    await Promise.allSettled(Object.values(runs));
  });

  after(async () => {
    squatter?.kill('SIGKILL');
    await squatter?.catch(() => undefined);
    await node?.stop().catch(() => undefined);
    await web?.close();
    await consul?.close();
    await aclConsul?.close();
    if (node) await removeDir(node.dir);
    if (work) await removeDir(work);
  });

  /** Runs doctor in a new mount namespace where `hosts` and `nsswitch` are /etc/hosts and /etc/nsswitch.conf. */
  async function doctor(name: string, files: { hosts: string; nsswitch: string; avahi?: boolean }, extra: string[] = []): Promise<{ exitCode: number; stdout: string; ms: number }> {
    const hosts = join(work, `${name}.hosts`);
    const nss = join(work, `${name}.nsswitch`);
    await writeFile(hosts, files.hosts);
    await writeFile(nss, files.nsswitch);
    const args = ['--consul', consul.url, '--admin', `${node.config.admin!.host}:${node.config.admin!.port}`, '--run-dir', node.config.runDir, '--hosts-file', '/etc/hosts', '--range', '127.78.0.0/16', ...extra];
    const run = `node --import tsx agent/cli/main.ts doctor ${args.map(sh).join(' ')}`;
    let script = `set -e; mount --bind ${sh(hosts)} /etc/hosts; mount --bind ${sh(nss)} /etc/nsswitch.conf; `;
    if (files.avahi) {
      // A real avahi-daemon, private to this namespace (its socket on a private /run): the mDNS module gets answers.
      const conf = join(work, 'avahi.conf');
      await writeFile(conf, avahiConf);
      script +=
        `mount -t tmpfs tmpfs /run; mkdir -p /run/avahi-daemon; ` +
        `avahi-daemon --no-drop-root --no-chroot --no-rlimits -f ${sh(conf)} >${sh(join(work, 'avahi.log'))} 2>&1 & A=$!; ` +
        `i=0; while [ ! -S /run/avahi-daemon/socket ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; `;
    }
    script += files.avahi ? `set +e; ${run}; rc=$?; kill $A; wait $A 2>/dev/null; exit $rc` : `exec ${run}`;
    const start = Date.now();
    const r = await execa('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { cwd: root, reject: false, timeout: 30_000 });
    const ms = Date.now() - start;
    return { exitCode: r.exitCode ?? -1, stdout: `${r.stdout}${r.stderr ? `\n[stderr] ${r.stderr}` : ''}`, ms };
  }

  test('(a) set up right: exit 0, every check ok', async (t) => {
    if (!unshare) return t.skip('cannot make a mount namespace here (unshare --mount needs root)');
    const r = await runs.right!;
    t.diagnostic(`doctor on a node set up right: exit ${r.exitCode} in ${r.ms} ms\n${r.stdout}`);
    const address = route(node.agent, 'web')!.address;
    assert.equal(r.exitCode, 0, r.stdout);
    assert.doesNotMatch(r.stdout, /^FAIL/m);
    assert.match(r.stdout, new RegExp(`^ok    resolve web\\.local: ${address.replace(/\./g, '\\.')}`, 'm'));
    assert.match(r.stdout, /^ok    admin: .* 1 routes/m);
    assert.match(r.stdout, /^ok    health: ok$/m);
    assert.match(r.stdout, /^ok    nsswitch: "hosts: files dns": files comes first$/m);
    assert.match(r.stdout, new RegExp(`^ok    data plane web: ${address.replace(/\./g, '\\.')}:${webPort} accepts a connection`, 'm'));
    assert.match(r.stdout, new RegExp(`^ok    port web: ${address.replace(/\./g, '\\.')}:${webPort} held by node \\(pid ${process.pid}\\)`, 'm'));
    assert.match(r.stdout, /^ok    consul: .* answers, leader /m);
    assert.match(r.stdout, /^ok    token: ACLs off$/m);
    assert.match(r.stdout, /^ok    run dir: /m);
    assert.match(r.stdout, /^ok    balancer\.json: parses: 1 services$/m);
  });

  test('(b) mdns4_minimal [NOTFOUND=return] before files, avahi running: exit 1, names mDNS and the fix', async (t) => {
    if (!unshare) return t.skip('cannot make a mount namespace here (unshare --mount needs root)');
    if (!avahi) return t.skip('avahi-daemon is not installed (apt-get install -y avahi-daemon libnss-mdns): without it the mdns module never answers');
    const r = await runs.mdns!;
    t.diagnostic(`doctor with mDNS before files: exit ${r.exitCode} in ${r.ms} ms\n${r.stdout}`);
    assert.equal(r.exitCode, 1, r.stdout);
    assert.match(r.stdout, /^FAIL  resolve web\.local: getaddrinfo finds nothing \(ENOTFOUND\); likely cause: nsswitch: .*multicast DNS/m);
    assert.match(r.stdout, /^FAIL  nsswitch: "hosts: mdns4_minimal \[NOTFOUND=return\] files": multicast DNS \(mdns4_minimal \[NOTFOUND=return\]\) comes before files .*avahi-daemon runs/m);
    assert.match(r.stdout, /^ {6}fix: in \/etc\/nsswitch\.conf: hosts: files mdns4_minimal \[NOTFOUND=return\] \(files first/m);
    // The rest of the node is fine: only the name lookup is named.
    assert.match(r.stdout, /^ok    data plane web: /m);
    assert.match(r.stdout, /^ok    hosts file: /m);
  });

  test('(c) a hosts file without the loopmesh block: exit 1, names the name', async (t) => {
    if (!unshare) return t.skip('cannot make a mount namespace here (unshare --mount needs root)');
    const r = await runs.noblock!;
    t.diagnostic(`doctor with no loopmesh block in /etc/hosts: exit ${r.exitCode} in ${r.ms} ms\n${r.stdout}`);
    assert.equal(r.exitCode, 1, r.stdout);
    assert.match(r.stdout, /^FAIL  resolve web\.local: getaddrinfo finds nothing \(ENOTFOUND\); likely cause: hosts file: \/etc\/hosts has no loopmesh block/m);
    assert.match(r.stdout, /^FAIL  hosts file: \/etc\/hosts has no loopmesh block/m);
    assert.match(r.stdout, /^ {6}fix: run the agent with --hosts-file \/etc\/hosts/m);
  });

  test('(e) another process holds a route\'s port: exit 1, names that process', async (t) => {
    if (!unshare) return t.skip('cannot make a mount namespace here (unshare --mount needs root)');
    const port = await freePort();
    // python3 on every address of the port: the agent cannot bind its 127.78.x.y:port.
    squatter = execa('python3', ['-c', `import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',${port}))\ns.listen()\nprint('up',flush=True)\ntime.sleep(60)`], { reject: false });
    await new Promise<void>((resolve) => squatter!.stdout!.once('data', () => resolve()));
    await consul.register({ id: 'api-a', name: 'api', port: web.port, meta: { 'loopmesh-port': String(port) }, ttlCheck: { passing: true } });
    await eventually(() => node.agent.statusReport().routes.find((r) => r.service === 'api')?.listening === false, 10_000, 'api reported not listening');
    await eventually(async () => /api\.local/.test(await readFile(node.config.hostsFile!, 'utf8')), 5000, 'api.local in the hosts block');
    const hosts = await readFile(node.config.hostsFile!, 'utf8');
    const r = await doctor('squatter', { hosts, nsswitch: goodNss });
    t.diagnostic(`doctor with a port taken: exit ${r.exitCode} in ${r.ms} ms\n${r.stdout}`);
    assert.equal(r.exitCode, 1, r.stdout);
    assert.match(r.stdout, new RegExp(`^FAIL  port api: 127\\.78\\.\\d+\\.\\d+:${port} is not loopmesh's: python3 \\(pid ${squatter.pid}\\) on 0\\.0\\.0\\.0:${port} holds it`, 'm'));
    assert.match(r.stdout, /^FAIL  listening: 1 of 2 routes not listening: api /m);
    assert.match(r.stdout, new RegExp(`^FAIL  data plane api: 127\\.78\\.\\d+\\.\\d+:${port} accepts a connection, but loopmesh does not listen there`, 'm'));
    assert.match(r.stdout, /^ok    port web: /m);
    squatter.kill('SIGKILL');
    await squatter.catch(() => undefined);
    squatter = undefined;
    await consul.deregister('api-a');
    await eventually(() => !node.agent.statusReport().routes.some((r) => r.service === 'api'), 10_000, 'api gone');
  });

  test('(d) a wrong token on a Consul with ACLs: exit 1, names the token', async (t) => {
    if (!unshare) return t.skip('cannot make a mount namespace here (unshare --mount needs root)');
    aclConsul = await TestConsul.start({ hcl: 'acl { enabled = true, default_policy = "deny", tokens { initial_management = "root-token" } }', token: 'root-token' });
    const hosts = await readFile(node.config.hostsFile!, 'utf8');
    const tokenFile = join(work, 'token');
    await writeFile(tokenFile, '11111111-2222-3333-4444-555555555555\n', { mode: 0o600 });
    const wrong = await doctor('wrong-token', { hosts, nsswitch: goodNss }, ['--consul', aclConsul.url, '--token-file', tokenFile]);
    t.diagnostic(`doctor with a wrong token: exit ${wrong.exitCode} in ${wrong.ms} ms\n${wrong.stdout}`);
    assert.equal(wrong.exitCode, 1, wrong.stdout);
    assert.match(wrong.stdout, /^FAIL  token: Consul refuses the token: token does not exist: ACL not found/m);
    // A valid token that lacks rights: each missing right is named.
    const policy = (await aclConsul.api('PUT', '/v1/acl/policy', { Name: 'catalog-only', Rules: 'service_prefix "" { policy = "read" } node_prefix "" { policy = "read" }' })) as { ID: string };
    assert.ok(policy.ID);
    const token = (await aclConsul.api('PUT', '/v1/acl/token', { Description: 'doctor test', Policies: [{ Name: 'catalog-only' }] })) as { SecretID: string };
    await writeFile(tokenFile, `${token.SecretID}\n`);
    const weak = await doctor('weak-token', { hosts, nsswitch: goodNss }, ['--consul', aclConsul.url, '--token-file', tokenFile]);
    t.diagnostic(`doctor with a token without KV rights: exit ${weak.exitCode}\n${weak.stdout}`);
    assert.equal(weak.exitCode, 1, weak.stdout);
    assert.match(weak.stdout, /^ok    token: valid: "doctor test", policies catalog-only$/m);
    assert.match(weak.stdout, /^FAIL  acl rights: the token lacks key:read loopmesh\/addresses \(the address table\), key:write loopmesh\/addresses/m);
    assert.doesNotMatch(weak.stdout, /lacks[^\n]*service:read/);
  });

  test('(d2) Consul stopped: exit 1, names Consul', async (t) => {
    if (!unshare) return t.skip('cannot make a mount namespace here (unshare --mount needs root)');
    const hosts = await readFile(node.config.hostsFile!, 'utf8');
    await consul.stop();
    const r = await doctor('consul-down', { hosts, nsswitch: goodNss });
    t.diagnostic(`doctor with Consul stopped: exit ${r.exitCode} in ${r.ms} ms\n${r.stdout}`);
    assert.equal(r.exitCode, 1, r.stdout);
    assert.match(r.stdout, new RegExp(`^FAIL  consul: Consul at ${consul.url.replace(/\./g, '\\.')} is unreachable for status\\.leader: .*ECONNREFUSED`, 'm'));
    assert.match(r.stdout, /^ {6}fix: start the local Consul agent, or give --consul the address it listens on/m);
    // The data plane still serves the last-known-good routes.
    assert.match(r.stdout, /^ok    resolve web\.local: /m);
  });
});
