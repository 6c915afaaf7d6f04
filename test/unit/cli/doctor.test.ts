import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  checkAdmin,
  checkConsul,
  checkDataPlane,
  checkGateways,
  checkHostsFile,
  checkNsswitch,
  checkPort,
  checkResolution,
  checkRunDirFacts,
  exitStatus,
  formatResults,
  nssFinding,
  parseHostsFile,
  parseNsswitchHosts,
  parseProcNetTcp,
  parseSs,
  type DoctorRoute,
  type ResolverFacts,
} from '../../../agent/cli/doctor.js';
import { parseStatusReport } from '../../../agent/cli/status.js';

const web: DoctorRoute = { service: 'web', fqdn: 'web.local', address: '127.77.0.1', port: 8080, listening: true, gateways: [] };
const api: DoctorRoute = { service: 'api', fqdn: 'api.local', address: '127.77.0.2', port: 9000, listening: false, gateways: [] };

const resolver = (nsswitch: string | undefined, more: Partial<ResolverFacts> = {}): ResolverFacts => ({
  nsswitchPath: '/etc/nsswitch.conf',
  nsswitch,
  avahiRunning: false,
  resolvConf: 'nameserver 10.0.0.53\n',
  lookupsFailed: false,
  suffix: 'local',
  ...more,
});

const block = (lines: string): string => `127.0.0.1 localhost\n# BEGIN loopmesh (managed by loopmesh; edits inside this block are overwritten) owner="/run/loopmesh" pid=42\n${lines}# END loopmesh\n`;

test('nsswitch: the hosts: line is parsed into sources and their [STATUS=action] lists', () => {
  const hosts = parseNsswitchHosts('# comment\npasswd: files\nhosts:   files mdns4_minimal [NOTFOUND=return UNAVAIL=continue] dns # trailing\n');
  assert.equal(hosts.line, 'hosts: files mdns4_minimal [NOTFOUND=return UNAVAIL=continue] dns');
  assert.deepEqual(hosts.sources, [
    { name: 'files', actions: {} },
    { name: 'mdns4_minimal', actions: { NOTFOUND: 'return', UNAVAIL: 'continue' } },
    { name: 'dns', actions: {} },
  ]);
  assert.deepEqual(hosts.junk, []);
  // No hosts: line: glibc's default, dns first.
  assert.deepEqual(parseNsswitchHosts('passwd: files\n').sources.map((s) => s.name), ['dns', 'files']);
  // Junk is kept aside, never a crash.
  assert.deepEqual(parseNsswitchHosts('hosts: files [NOTFOUND=return dns %%% \n').junk, ['[NOTFOUND=return dns %%%']);
  assert.deepEqual(parseNsswitchHosts('hosts: [NOTFOUND=return] files').junk, ['[NOTFOUND=return]']);
});

test('nsswitch: mdns4_minimal [NOTFOUND=return] before files takes .local away (FAIL when avahi runs)', () => {
  const line = 'hosts: mdns4_minimal [NOTFOUND=return] files dns\n';
  assert.equal(nssFinding(parseNsswitchHosts(line)).blocker?.name, 'mdns4_minimal');
  const failing = checkNsswitch(resolver(line, { avahiRunning: true }));
  assert.equal(failing.verdict, 'FAIL');
  assert.match(failing.seen, /multicast DNS \(mdns4_minimal \[NOTFOUND=return\]\) comes before files and owns \.local: avahi-daemon runs/);
  assert.equal(failing.fix, 'in /etc/nsswitch.conf: hosts: files mdns4_minimal [NOTFOUND=return] dns (files first, so the hosts file answers .local before anything else)');
  // avahi not running: the module is unavailable and files still answers, for now.
  const latent = checkNsswitch(resolver(line));
  assert.equal(latent.verdict, 'warn');
  assert.match(latent.seen, /avahi-daemon is not running now/);
  // A lookup that failed makes it a FAIL whatever avahi's state.
  assert.equal(checkNsswitch(resolver(line, { lookupsFailed: true })).verdict, 'FAIL');
  // The plain mdns module with the same action, too.
  assert.equal(checkNsswitch(resolver('hosts: mdns [NOTFOUND=return] files', { avahiRunning: true })).verdict, 'FAIL');
});

test('nsswitch: files first is ok, even with mdns4_minimal [NOTFOUND=return] after it (Debian\'s default)', () => {
  const r = checkNsswitch(resolver('hosts: files mdns4_minimal [NOTFOUND=return] dns myhostname\n', { avahiRunning: true }));
  assert.equal(r.verdict, 'ok');
  assert.match(r.seen, /files comes first/);
});

test('nsswitch: no files source: the hosts file is never read', () => {
  const r = checkNsswitch(resolver('hosts: dns\n', { lookupsFailed: true }));
  assert.equal(r.verdict, 'FAIL');
  assert.match(r.seen, /no files source, so the hosts file \(and its loopmesh block\) is never read; lookups go to dns \(nameservers 10\.0\.0\.53\)/);
  assert.match(r.fix ?? '', /hosts: files dns/);
  // Names that still resolve (DNS sends .local to loopmesh's responder): only a warning.
  assert.equal(checkNsswitch(resolver('hosts: dns\n')).verdict, 'warn');
});

test('nsswitch: dns [NOTFOUND=return] or resolve [!UNAVAIL=return] before files end the lookup', () => {
  const dns = checkNsswitch(resolver('hosts: dns [NOTFOUND=return] files', { lookupsFailed: true }));
  assert.equal(dns.verdict, 'FAIL');
  assert.match(dns.seen, /dns \[NOTFOUND=return\] \(nameservers 10\.0\.0\.53\) comes before files and ends the lookup on a miss/);
  const resolved = checkNsswitch(resolver('hosts: resolve [!UNAVAIL=return] files'));
  assert.equal(resolved.verdict, 'warn');
  assert.match(resolved.seen, /systemd-resolved/);
  // glibc's default (no hosts: line) is dns [!UNAVAIL=return] files.
  assert.match(checkNsswitch(resolver('passwd: files\n')).seen, /no hosts: line \(glibc's default/);
});

test('nsswitch: mdns4 (not minimal) before files without an action: slow, a warning', () => {
  const r = checkNsswitch(resolver('hosts: mdns4 files'));
  assert.equal(r.verdict, 'warn');
  assert.match(r.seen, /mdns4 before files asks multicast DNS first/);
});

test('nsswitch: an unreadable file is a warning naming it; a missing one is glibc\'s default', () => {
  const r = checkNsswitch(resolver(undefined, { nsswitchError: 'EACCES: permission denied' }));
  assert.equal(r.verdict, 'warn');
  assert.match(r.seen, /cannot read \/etc\/nsswitch\.conf \(EACCES/);
  assert.match(checkNsswitch(resolver(undefined, { nsswitchError: 'ENOENT: no such file' })).seen, /glibc's default/);
});

test('hosts file: the block, names outside it, junk inside it', () => {
  const parsed = parseHostsFile(`127.0.0.1 localhost\n127.0.0.9 web.local\r\n${block('127.77.0.1 web.local\n127.77.0.1 10.9.9.9\n%%% junk\n127.77.0.2\tAPI.local\n')}`);
  assert.equal(parsed.found, true);
  assert.deepEqual([...parsed.names], [['web.local', ['127.77.0.1']], ['10.9.9.9', ['127.77.0.1']], ['api.local', ['127.77.0.2']]]);
  assert.deepEqual(parsed.outside.get('web.local'), { line: 2, address: '127.0.0.9' });
  assert.deepEqual(parsed.junk, [{ line: 7, text: '%%% junk' }]);
  assert.equal(parsed.unclosed, false);
  assert.equal(parseHostsFile('# BEGIN loopmesh\n127.77.0.1 web.local\n').unclosed, true);
});

test('hosts file: no block at all -> FAIL naming the file and the fix', () => {
  const r = checkHostsFile({ path: '/etc/hosts', systemPath: '/etc/hosts', text: '127.0.0.1 localhost\n' }, [web]);
  assert.equal(r.length, 1);
  assert.equal(r[0]?.verdict, 'FAIL');
  assert.match(r[0]?.seen ?? '', /\/etc\/hosts has no loopmesh block/);
  assert.match(r[0]?.fix ?? '', /--hosts-file \/etc\/hosts/);
});

test('hosts file: a block without the name, with another address, a line outside the block', () => {
  const text = `127.0.0.5 web.local\n${block('127.77.0.9 api.local\n')}`;
  const r = checkHostsFile({ path: '/etc/hosts', systemPath: '/etc/hosts', text }, [web, api]);
  const lines = formatResults(r);
  assert.match(lines, /^FAIL  hosts file: the loopmesh block in \/etc\/hosts has no line for web\.local \(route 127\.77\.0\.1:8080\)$/m);
  assert.match(lines, /^FAIL  hosts file: the loopmesh block in \/etc\/hosts gives api\.local 127\.77\.0\.9; the route is 127\.77\.0\.2$/m);
  assert.match(lines, /^warn  hosts file: \/etc\/hosts line 1, outside the loopmesh block, maps web\.local to 127\.0\.0\.5$/m);
  assert.doesNotMatch(lines, /^ok/m);
});

test('hosts file: all names present -> ok; another file than the resolver reads -> warn; off -> warn; unreadable -> FAIL', () => {
  const good = checkHostsFile({ path: '/etc/hosts', systemPath: '/etc/hosts', text: block('127.77.0.1 web.local\n127.77.0.2 api.local\n') }, [web, api]);
  assert.deepEqual(good.map((c) => c.verdict), ['ok']);
  const other = checkHostsFile({ path: '/tmp/hosts', systemPath: '/etc/hosts', text: block('127.77.0.1 web.local\n') }, [web]);
  assert.deepEqual(other.map((c) => c.verdict), ['warn', 'ok']);
  assert.match(other[0]?.seen ?? '', /the agent writes \/tmp\/hosts, but the system resolver reads \/etc\/hosts/);
  assert.equal(checkHostsFile({ path: undefined, systemPath: '/etc/hosts', text: undefined }, [web])[0]?.verdict, 'warn');
  const unreadable = checkHostsFile({ path: '/etc/hosts', systemPath: '/etc/hosts', text: undefined, error: 'EACCES: permission denied' }, [web]);
  assert.equal(unreadable[0]?.verdict, 'FAIL');
  // Binary junk in the file never throws.
  assert.doesNotThrow(() => checkHostsFile({ path: '/etc/hosts', systemPath: '/etc/hosts', text: '\u0000\u0001\uffff\n# BEGIN loopmesh\n\u0007\n' }, [web]));
});

test('resolution: the route\'s address first is ok; nothing or another address is FAIL with the likely cause', () => {
  assert.equal(checkResolution(web, { addresses: ['127.77.0.1', '::1'] }, []).verdict, 'ok');
  const cause = checkNsswitch(resolver('hosts: mdns4_minimal [NOTFOUND=return] files', { avahiRunning: true }));
  const none = checkResolution(web, { error: 'ENOTFOUND' }, [cause]);
  assert.equal(none.verdict, 'FAIL');
  assert.match(none.seen, /^getaddrinfo finds nothing \(ENOTFOUND\); likely cause: nsswitch: .*multicast DNS/);
  assert.equal(none.fix, cause.fix);
  const other = checkResolution(web, { addresses: ['10.1.2.3'] }, []);
  assert.equal(other.verdict, 'FAIL');
  assert.match(other.seen, /getaddrinfo gives 10\.1\.2\.3, not the route's 127\.77\.0\.1/);
  assert.match(other.fix ?? '', /put files first/);
  assert.match(checkResolution(web, { addresses: ['10.1.2.3', '127.77.0.1'] }, []).seen, /with the route's 127\.77\.0\.1 not first/);
});

test('admin: a report of the wrong shape is one clear line, not a crash', () => {
  assert.throws(() => parseStatusReport({ consul: null, routes: 'nope' }), /\/v1\/routes routes: expected an array, got "nope"/);
  const invalid = checkAdmin({ state: 'invalid', url: 'http://127.0.0.1:9190/v1/routes', error: '/v1/routes routes: expected an array, got "nope"' }, { routes: 1 });
  assert.equal(formatResults(invalid), 'FAIL  admin: http://127.0.0.1:9190/v1/routes answers, but not with a loopmesh report (/v1/routes routes: expected an array, got "nope"); the 1 routes of balancer.json are checked instead\n      fix: is --admin the port of this node\'s loopmesh? doctor and the agent may also be of different versions');
  const report = parseStatusReport({ node: 'n1', consul: { connected: true }, routes: [{ service: 'web', fqdn: 'web.local', address: '127.77.0.1', port: 8080, listening: true }, { service: 7 }], health: { status: 'ok', reasons: [] } });
  const lines = formatResults(checkAdmin({ state: 'answered', url: 'http://127.0.0.1:9190/v1/routes', report }, undefined));
  assert.match(lines, /^ok    admin: http:\/\/127\.0\.0\.1:9190\/v1\/routes answers: node n1, 1 routes, served in process$/m);
  assert.match(lines, /^FAIL  admin report: routes\[1\]: expected service, fqdn, address \(strings\) and port \(an integer\), got \{"service":7\}$/m);
  assert.match(lines, /^ok    health: ok$/m);
});

test('admin: not listening, health failing, Consul lost, unreachable, off', () => {
  const report = parseStatusReport({
    node: 'n1',
    consul: { connected: false, lastError: { message: 'connect ECONNREFUSED' } },
    routes: [{ ...web }, { ...api }],
    health: { status: 'failing', reasons: [{ code: 'LM_ERR_BALANCER_LISTEN', message: 'service "api" is not listening on 127.77.0.2:9000: EADDRINUSE' }] },
  });
  const lines = formatResults(checkAdmin({ state: 'answered', url: 'u', report }, undefined));
  assert.match(lines, /^FAIL  listening: 1 of 2 routes not listening: api 127\.77\.0\.2:9000$/m);
  assert.match(lines, /^FAIL  health: failing: LM_ERR_BALANCER_LISTEN: service "api" is not listening/m);
  assert.match(lines, /^FAIL  agent consul: the agent has lost Consul: connect ECONNREFUSED/m);
  const down = checkAdmin({ state: 'unreachable', url: 'http://127.0.0.1:9190/v1/routes', error: 'ECONNREFUSED' }, { routes: 3 });
  assert.equal(down[0]?.verdict, 'FAIL');
  assert.match(down[0]?.seen ?? '', /does not answer \(ECONNREFUSED\); the 3 routes of balancer\.json are checked instead/);
  assert.equal(checkAdmin({ state: 'off' }, undefined)[0]?.verdict, 'warn');
});

test('ports: ss and /proc/net/tcp parse; a route not listening and held by another process names it', () => {
  const ss = [
    'LISTEN 0      511     127.77.0.1:8080 0.0.0.0:* users:(("node",pid=100,fd=20))',
    'LISTEN 0      128        0.0.0.0:9000 0.0.0.0:* users:(("python3",pid=200,fd=3))',
    'LISTEN 0      4096   127.0.0.53%lo:53 0.0.0.0:*',
    'LISTEN 0      511           [::]:80    [::]:* users:(("nginx",pid=300,fd=6),("nginx",pid=301,fd=6))',
    'garbage line',
  ].join('\n');
  const listeners = parseSs(ss);
  assert.deepEqual(listeners, [
    { address: '127.77.0.1', port: 8080, process: 'node', pid: 100 },
    { address: '0.0.0.0', port: 9000, process: 'python3', pid: 200 },
    { address: '127.0.0.53', port: 53 },
    { address: '::', port: 80, process: 'nginx', pid: 300 },
  ]);
  const loopmesh = new Set([100]);
  const taken = checkPort(api, listeners, loopmesh);
  assert.equal(taken.verdict, 'FAIL');
  assert.equal(taken.seen, "127.77.0.2:9000 is not loopmesh's: python3 (pid 200) on 0.0.0.0:9000 holds it");
  assert.match(taken.fix ?? '', /stop that process or move it off port 9000/);
  assert.equal(checkPort(web, listeners, loopmesh).verdict, 'ok');
  const free = checkPort({ ...api, port: 9999 }, listeners, loopmesh);
  assert.match(free.seen, /loopmesh does not listen and nothing else holds the port/);
  assert.equal(checkPort({ ...web, listening: null, port: 9999 }, listeners, loopmesh).verdict, 'FAIL');
  assert.equal(checkPort(web, undefined, loopmesh).verdict, 'warn');
  const proc = parseProcNetTcp('  sl  local_address rem_address   st\n   0: 01004D7F:1F90 00000000:0000 0A 0\n   1: 0100007F:0050 0100007F:9999 01 0\n');
  assert.deepEqual(proc, [{ address: '127.77.0.1', port: 8080 }]);
});

test('data plane and gateways: a refused connect is FAIL; no gateway answering is only a warning', () => {
  assert.equal(checkDataPlane(web, { ok: true, ms: 1 }).verdict, 'ok');
  const squatted = checkDataPlane(api, { ok: true, ms: 1 });
  assert.equal(squatted.verdict, 'FAIL');
  assert.match(squatted.seen, /accepts a connection, but loopmesh does not listen there: another process answers api\.local's clients/);
  assert.match(checkDataPlane(web, { ok: false, error: 'ECONNREFUSED' }).seen, /127\.77\.0\.1:8080 does not accept a connection \(ECONNREFUSED\)/);
  assert.equal(checkGateways(web, []), undefined);
  const gw = { ...web, gateways: [{ id: 'g1', address: '10.77.77.129', port: 8080 }, { id: 'g2', address: '10.77.77.130', port: 8080 }] };
  const none = checkGateways(gw, gw.gateways.map((g) => ({ gateway: g, result: { ok: false as const, error: 'ETIMEDOUT' } })));
  assert.equal(none?.verdict, 'warn');
  assert.match(none?.seen ?? '', /none of the 2 gateways answers: 10\.77\.77\.129:8080 \(ETIMEDOUT\), 10\.77\.77\.130:8080 \(ETIMEDOUT\)/);
  const one = checkGateways(gw, [{ gateway: gw.gateways[0]!, result: { ok: true, ms: 2 } }, { gateway: gw.gateways[1]!, result: { ok: false, error: 'ECONNREFUSED' } }]);
  assert.equal(one?.verdict, 'ok');
  assert.match(one?.seen ?? '', /1 of 2 gateways answer; down: 10\.77\.77\.130:8080/);
});

test('consul: unreachable, no leader, ACLs off, a refused token, missing rights', () => {
  const url = 'http://127.0.0.1:8500';
  const down = checkConsul({ url, tokenGiven: false, leader: { ok: false, code: 'LM_ERR_CONSUL_UNREACHABLE', error: `Consul at ${url} is unreachable for status.leader: connect ECONNREFUSED 127.0.0.1:8500` } });
  assert.equal(down.length, 1);
  assert.equal(down[0]?.verdict, 'FAIL');
  assert.match(down[0]?.fix ?? '', /start the local Consul agent/);
  assert.match(checkConsul({ url, tokenGiven: false, leader: { ok: false, code: 'LM_ERR_CONSUL_TLS', error: 'x' } })[0]?.fix ?? '', /--ca-file/);
  assert.equal(checkConsul({ url, tokenGiven: false, leader: { ok: true, leader: '' } })[0]?.verdict, 'FAIL');
  const off = checkConsul({ url, tokenGiven: true, leader: { ok: true, leader: '127.0.0.1:8300' }, token: { status: 401, body: 'ACL support disabled' } });
  assert.deepEqual(off.map((c) => [c.verdict, c.check, c.seen]), [['ok', 'consul', `${url} answers, leader 127.0.0.1:8300`], ['ok', 'token', 'ACLs off (the token given is not needed)']]);
  const refused = checkConsul({ url, tokenGiven: true, leader: { ok: true, leader: 'x' }, token: { status: 403, body: 'token does not exist: ACL not found' } });
  assert.equal(refused[1]?.verdict, 'FAIL');
  assert.equal(refused[1]?.seen, 'Consul refuses the token: token does not exist: ACL not found');
  assert.match(checkConsul({ url, tokenGiven: false, leader: { ok: true, leader: 'x' }, token: { status: 403, body: 'ACL not found' } })[1]?.seen ?? '', /ACLs are on and no token is given/);
  const weak = checkConsul({
    url,
    tokenGiven: true,
    leader: { ok: true, leader: 'x' },
    token: { status: 200, body: JSON.stringify({ Description: 'node token', Policies: [{ Name: 'catalog' }] }) },
    rights: [
      { what: 'key:read loopmesh/addresses', needed: 'the address table', allowed: false },
      { what: 'service:read web', needed: 'reading the catalog', allowed: true },
    ],
  });
  assert.equal(weak[1]?.seen, 'valid: "node token", policies catalog');
  assert.equal(weak[2]?.verdict, 'FAIL');
  assert.equal(weak[2]?.seen, 'the token lacks key:read loopmesh/addresses (the address table)');
  assert.equal(weak[2]?.fix, 'add to the token\'s policy: key "loopmesh/addresses" { policy = "read" }');
  const full = checkConsul({ url, tokenGiven: true, leader: { ok: true, leader: 'x' }, token: { status: 200, body: '{}' }, rights: [{ what: 'key:write loopmesh/addresses', needed: 'n', allowed: true }] });
  assert.deepEqual(full.map((c) => c.verdict), ['ok', 'ok', 'ok']);
  assert.equal(full[2]?.seen, 'key:write loopmesh/addresses');
  // A token/self answer that is not JSON is named, not thrown.
  assert.match(checkConsul({ url, tokenGiven: true, leader: { ok: true, leader: 'x' }, token: { status: 200, body: '<html>' } })[1]?.seen ?? '', /not JSON/);
});

test('run dir: missing, unsafe, balancer.json missing or broken', () => {
  assert.match(checkRunDirFacts({ dir: '/run/loopmesh', dirError: { code: 'ENOENT', message: 'x' } })[0]?.seen ?? '', /\/run\/loopmesh does not exist/);
  const unsafe = checkRunDirFacts({ dir: '/tmp/x', dirError: { code: 'LM_ERR_RUN_DIR_UNSAFE', message: 'run dir /tmp/x is owned by uid 1000 with mode 0777; expected ...' } });
  assert.equal(unsafe[0]?.verdict, 'FAIL');
  assert.match(unsafe[0]?.seen ?? '', /mode 0777/);
  assert.deepEqual(checkRunDirFacts({ dir: '/d', balancer: 'missing' }).map((c) => c.verdict), ['ok', 'warn']);
  const broken = checkRunDirFacts({ dir: '/d', balancer: { code: 'LM_ERR_BALANCER_CONFIG', message: 'balancer.json: not valid JSON' } });
  assert.deepEqual(broken.map((c) => c.verdict), ['ok', 'FAIL']);
  assert.deepEqual(checkRunDirFacts({ dir: '/d', balancer: { routes: 2 } }).map((c) => c.seen), ['/d: a directory of this user, not writable by group or others', 'parses: 2 services']);
});

test('output: one line per check, a fix line under each problem, exit 1 only on FAIL', () => {
  const results = [
    { verdict: 'ok' as const, check: 'a', seen: 'fine', fix: 'never printed' },
    { verdict: 'warn' as const, check: 'b', seen: 'meh', fix: 'do b' },
    { verdict: 'FAIL' as const, check: 'c', seen: 'broken\u001b[31m', fix: 'do c' },
  ];
  assert.equal(formatResults(results), 'ok    a: fine\nwarn  b: meh\n      fix: do b\nFAIL  c: broken\\u001b[31m\n      fix: do c');
  assert.equal(exitStatus(results), 1);
  assert.equal(exitStatus(results.slice(0, 2)), 0);
});
