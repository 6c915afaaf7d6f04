import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { execa, type Result } from 'execa';

// The Vagrant lab booted for real (issue 11): virtual machines with systemd as PID 1, the offline
// box and bundle, real Consul, real curl and redis-cli. Run alone with `npm run test:vagrant`
// (`npm test` leaves it out: the VMs take minutes). It uses the lab `scripts/vagrant-lab.sh up`
// brought up and leaves it up, else brings up its own and takes it down at the end, checking that
// nothing is left. Skipped, saying why, only where neither KVM nor QEMU's emulation can run the VMs.

const repo = join(import.meta.dirname, '..', '..');
const labScript = join(repo, 'scripts', 'vagrant-lab.sh');
const cacheDir = process.env.LOOPMESH_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'loopmesh');
const state = join(cacheDir, 'vagrant-lab');
const sshConfig = join(state, 'ssh-config');

function lab(args: string[], timeout: number): Promise<Result> {
  return execa('bash', [labScript, ...args], { reject: false, timeout, all: true, env: { FORCE_COLOR: '0' } });
}

function must(r: Result, what: string): string {
  assert.equal(r.exitCode, 0, `${what} exited with ${r.exitCode ?? r.signal}${r.timedOut ? ' (timed out)' : ''}:\n${String(r.all ?? `${r.stdout}\n${r.stderr}`).slice(-4000)}`);
  return String(r.stdout).trim();
}

/** Why the lab cannot run here, or undefined when it can (then the box is built and the accelerator known). */
async function skipReason(): Promise<string | undefined> {
  if (process.platform !== 'linux') return `the Vagrant lab needs a Linux host (libvirt, QEMU), this is ${process.platform}`;
  if (process.getuid?.() !== 0) return 'the Vagrant lab needs root (libvirt\'s system instance, debootstrap): sudo npm run test:vagrant';
  const r = await lab(['accel'], 1_800_000);
  if (r.exitCode === 3) return `neither KVM nor QEMU's emulation can run the VMs here: ${String(r.stdout).replace(/^none: /, '')}`;
  accelLine = must(r, 'scripts/vagrant-lab.sh accel (installs qemu/libvirt/vagrant, builds the box once)');
  return undefined;
}
let accelLine = '';
const skip = await skipReason();

/** The lab's settings as `vagrant-lab.sh up` wrote them (NODES, LAB_SUBNET_PREFIX, ...). */
function labEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of readFileSync(join(state, 'env'), 'utf8').split('\n')) {
    const m = /^([A-Z_]+)=(.*)$/.exec(line);
    if (m?.[1] && m[2] !== undefined) env[m[1]] = m[2];
  }
  return env;
}

/** Runs a bash script as root on a VM (stdin to `sudo bash -s` over ssh; one shared connection per VM). */
function onVm(vm: string, script: string, timeout = 120_000): Promise<Result> {
  return execa(
    'ssh',
    ['-F', sshConfig, '-o', 'ControlMaster=auto', '-o', `ControlPath=${state}/cm-%h`, '-o', 'ControlPersist=600', '-o', 'ConnectTimeout=30', vm, 'sudo', 'bash', '-s'],
    { input: `set -euo pipefail\n${script}`, reject: false, timeout, all: true },
  );
}
async function mustOnVm(vm: string, script: string, timeout?: number): Promise<string> {
  return must(await onVm(vm, script, timeout), `on ${vm}: ${script.split('\n')[0]}`);
}

async function eventually(check: () => Promise<boolean>, ms: number, what: string): Promise<number> {
  const start = Date.now();
  for (;;) {
    if (await check()) return Date.now() - start;
    if (Date.now() - start > ms) assert.fail(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

interface Route { service: string; address: string; port: number; backends: Array<{ address: string; port: number }> }
async function routes(vm: string): Promise<Route[]> {
  return (JSON.parse(await mustOnVm(vm, 'curl -sf --max-time 5 http://127.0.0.1:9190/v1/routes')) as { routes: Route[] }).routes;
}

/** n sequential `curl http://web.local/` on vm: failures, and which instances answered. */
async function curlWeb(vm: string, n: number): Promise<{ failed: number; answered: string[] }> {
  const out = await mustOnVm(vm, `for i in $(seq 1 ${n}); do curl -s --max-time 5 http://web.local/ || echo CURL-FAILED; echo; done`);
  const lines = out.split('\n').filter((l) => l.trim() !== '');
  const failed = lines.filter((l) => l.includes('CURL-FAILED')).length;
  const answered = [...new Set(lines.map((l) => /hello from (\S+)/.exec(l)?.[1]).filter((x): x is string => x !== undefined))].sort();
  assert.equal(lines.length, n, `one answer line per curl: ${out}`);
  return { failed, answered };
}

interface LoadResult { newOk: number; newFailed: number; slow: number; open: Array<{ ok: number; failed: number; sockets: number }>; addresses: string[]; failures: Record<string, number> }
/** test/lab/load.mjs on vm (HTTP by name: 4 open connections + a new one every 100 ms) around `action`, run 2 s into it. */
async function underLoad(vm: string, action: string, ms = 30_000): Promise<{ load: LoadResult; action: string }> {
  const out = await mustOnVm(
    vm,
    `node /vagrant/test/lab/load.mjs web.local 80 ${ms} 100 4 >/tmp/lm-load.json & load=$!
sleep 2
{ ${action} || echo "failed with exit code $?"; } 2>&1 | sed 's/^/ACTION: /'
wait $load
cat /tmp/lm-load.json`,
    ms + 120_000,
  );
  const lines = out.split('\n');
  return { load: JSON.parse(lines.at(-1) ?? '') as LoadResult, action: lines.filter((l) => l.startsWith('ACTION: ')).join('\n') };
}

describe('the Vagrant lab on virtual machines (scripts/vagrant-lab.sh, vagrant/, scripts/provision)', { skip, timeout: 5_400_000 }, () => {
  let owned = false;
  let nodes = 2;
  let net = '10.77.77';
  let webNodes: string[] = [];
  let redisNode = '';
  let clients: string[] = [];

  before(async () => {
    const running = existsSync(sshConfig) && (await execa('virsh', ['-c', 'qemu:///system', 'list', '--name'], { reject: false })).stdout.split('\n').includes('vagrant_lm-server');
    if (running) {
      console.log(`# using the lab that is up (${accelLine}); it stays up`);
    } else {
      const started = Date.now();
      must(await lab(['up'], 3_600_000), 'scripts/vagrant-lab.sh up');
      owned = true;
      console.log(`# scripts/vagrant-lab.sh up: ${Math.round((Date.now() - started) / 1000)} s (${accelLine}; ${readFileSync(join(state, 'last-up'), 'utf8').trim()})`);
    }
    const env = labEnv();
    nodes = Number(env.NODES);
    net = env.LAB_SUBNET_PREFIX ?? net;
    clients = Array.from({ length: nodes }, (_, i) => `lm-node${i + 1}`);
    // scripts/provision/lib.sh's lm_demo_role: web on the last two client VMs, redis on the last one.
    webNodes = clients.filter((_, i) => i + 1 >= nodes - 1);
    redisNode = clients.at(-1) ?? '';
    assert.ok(nodes >= 2, `the lab test needs two client VMs or more (a service registered on another VM, a VM halted), the lab has NODES=${nodes}`);
  });

  after(async () => {
    // The shared ssh connections (ControlPersist) end with the test, not 10 minutes later.
    for (const vm of ['lm-server', ...clients]) {
      await execa('ssh', ['-F', sshConfig, '-o', `ControlPath=${state}/cm-%h`, '-O', 'exit', vm], { reject: false, timeout: 10_000 });
    }
    if (!owned) return;
    const started = Date.now();
    const down = await lab(['down'], 900_000);
    console.log(`# scripts/vagrant-lab.sh down: ${Math.round((Date.now() - started) / 1000)} s`);
    must(down, 'scripts/vagrant-lab.sh down');
    const virsh = (...args: string[]): Promise<string> => execa('virsh', ['-c', 'qemu:///system', ...args], { reject: false }).then((r) => String(r.stdout));
    const left = [
      ...(await virsh('list', '--all', '--name')).split('\n').filter((n) => n.startsWith('vagrant_lm-')).map((n) => `domain ${n}`),
      ...(await virsh('vol-list', 'default')).split('\n').filter((l) => /vagrant_lm-|loopmesh-lab/.test(l)).map((l) => `volume ${l.trim()}`),
      ...(await virsh('net-list', '--all', '--name')).split('\n').filter((n) => n.startsWith('vagrant-')).map((n) => `network ${n}`),
      ...(await execa('pgrep', ['-a', '-f', 'guest=vagrant_lm-'], { reject: false })).stdout.split('\n').filter(Boolean).map((p) => `process ${p}`),
    ];
    assert.deepEqual(left, [], 'nothing of the lab is left after down');
  });

  test('every VM runs systemd as PID 1, and its units are active: consul, loopmesh-balancer, loopmesh (and loopmesh-gateway on lm-server); none failed', async () => {
    for (const vm of ['lm-server', ...clients]) {
      const units = ['consul', 'loopmesh-balancer', 'loopmesh', ...(vm === 'lm-server' ? ['loopmesh-gateway'] : [])];
      const out = await mustOnVm(vm, `echo "pid1 $(readlink /proc/1/exe)"
for u in ${units.join(' ')}; do echo "unit $u $(systemctl is-active $u || true)"; done
echo "failed $(systemctl --failed --plain --no-legend | awk '{print $1}' | paste -sd, -)"`);
      assert.match(out, /^pid1 \/(usr\/)?lib\/systemd\/systemd$/m, `${vm}: PID 1 is systemd`);
      for (const u of units) assert.match(out, new RegExp(`^unit ${u} active$`, 'm'), `${vm}: ${u} is active:\n${out}`);
      assert.match(out, /^failed *$/m, `${vm}: no failed unit:\n${out}`);
    }
  });

  test("loopmesh runs as its own user: the balancer with CAP_NET_BIND_SERVICE alone, the control plane with no capability, both with no_new_privs; /etc/hosts is group loopmesh, 664", async () => {
    const out = await mustOnVm('lm-node1', `for u in loopmesh-balancer loopmesh; do
  pid=$(systemctl show -p MainPID --value $u)
  echo "$u $(ps -o user= -p $pid) $(awk '/^CapEff/ {print $2}' /proc/$pid/status) $(awk '/^NoNewPrivs/ {print $2}' /proc/$pid/status)"
done
echo "hosts $(stat -c '%G %a' /etc/hosts)"`);
    assert.match(out, /^loopmesh-balancer loopmesh 0000000000000400 1$/m, out);
    assert.match(out, /^loopmesh loopmesh 0000000000000000 1$/m, out);
    assert.match(out, /^hosts loopmesh 664$/m, out);
  });

  test('names resolve through the hosts block for every program (getent as root and as nobody, Node.js, curl), the same address on every VM and from the DNS responder', async () => {
    const out = await mustOnVm('lm-node1', `grep '^hosts:' /etc/nsswitch.conf
sed -n '/^# BEGIN loopmesh/,/^# END loopmesh/p' /etc/hosts
echo "getent $(getent hosts web.local | awk 'NR == 1 {print $1}')"
echo "nobody $(runuser -u nobody -- getent hosts redis.local | awk 'NR == 1 {print $1}')"
echo "node $(runuser -u nobody -- node -e "require('dns').lookup('web.local', {family: 4}, (e, a) => console.log(e ? e.code : a))")"
echo "dig $(dig +short +time=2 +tries=1 @127.0.0.1 -p 8653 web.local)"
echo "curl $(curl -s -o /dev/null --max-time 5 -w '%{remote_ip}' http://web.local/)"`);
    assert.match(out, /^hosts:\s+files\b/m, 'nsswitch reads /etc/hosts first');
    const block = /^# BEGIN loopmesh[\s\S]*^# END loopmesh/m.exec(out)?.[0] ?? '';
    for (const name of ['web.local', 'redis.local']) assert.match(block, new RegExp(`^127\\.\\S+ ${name.replace('.', '\\.')}$`, 'm'), `${name} in the loopmesh block of /etc/hosts:\n${out}`);
    const web = /^getent (\S+)$/m.exec(out)?.[1] ?? '';
    assert.match(web, /^127\.\d+\.\d+\.\d+$/, `getent hosts web.local: ${out}`);
    assert.notEqual(web, '127.0.0.1');
    assert.match(/^nobody (\S+)$/m.exec(out)?.[1] ?? '', /^127\./, `redis.local for the user nobody: ${out}`);
    for (const how of ['node', 'dig', 'curl']) assert.equal(new RegExp(`^${how} (\\S+)$`, 'm').exec(out)?.[1], web, `${how} gets web.local's address: ${out}`);
    for (const vm of ['lm-server', ...clients.slice(1)]) {
      assert.equal(await mustOnVm(vm, "getent hosts web.local | awk 'NR == 1 {print $1}'"), web, `web.local has the same address on ${vm}`);
    }
  });

  test('from lm-node1, curl http://web.local/ reaches web on both web VMs and redis-cli -h redis.local answers', async (t) => {
    const { failed, answered } = await curlWeb('lm-node1', 30);
    assert.equal(failed, 0);
    assert.deepEqual(answered, webNodes.map((n) => `web-${n}`), 'both web instances answer');
    const out = await mustOnVm('lm-node1', `redis-cli -h redis.local ping
redis-cli -h redis.local set loopmesh-lab "from lm-node1" >/dev/null
redis-cli -h redis.local get loopmesh-lab`);
    assert.deepEqual(out.split('\n'), ['PONG', 'from lm-node1'], `redis on ${redisNode} through redis.local`);
    t.diagnostic(`web answered by ${answered.join(', ')}; redis on ${redisNode}`);
  });

  // Within a second where the VMs run on KVM. Under QEMU's emulation every step is several times
  // slower, Consul's own (the registration on lm-node2 seen in lm-node1's catalog) about 2 to 3 s.
  test('a service registered through another VM\'s Consul agent is reachable from lm-node1 by name within a second (under emulation: most within 5 s; 10 services, one after another)', async (t) => {
    // converge.mjs on lm-node1 registers each with lm-node2's agent (over the private network),
    // pointing at lm-node2's web instance, and times until getent + an HTTP GET by name reach it.
    const other = 'lm-node2';
    const addr = `${net}.12`;
    // Two first, not timed: under emulation the first changes after a start also pay V8's compilation.
    await mustOnVm('lm-node1', `node /vagrant/test/lab/converge.mjs http://${addr}:8500 ${addr} 8080 2 web-${other}`, 120_000);
    const out = await mustOnVm('lm-node1', `node /vagrant/test/lab/converge.mjs http://${addr}:8500 ${addr} 8080 10 web-${other}`, 300_000);
    const { times, misses } = JSON.parse(out.split('\n').at(-1) ?? '') as { times: number[]; misses: string[] };
    const sorted = [...times].sort((a, b) => a - b);
    t.diagnostic(`registered on ${other} -> reachable from lm-node1 by name: ${sorted.join(', ')} ms`);
    if (accelLine.startsWith('kvm')) {
      assert.deepEqual(misses, [], 'every new service became reachable within 5 s');
      assert.ok((sorted.at(-1) ?? Infinity) <= 1000, `the slowest took ${sorted.at(-1)} ms; expected within 1 s`);
      return;
    }
    // Under emulation (measured 2.1 to 6.6 s, converge.mjs gives up at 5 s): most within 5 s.
    assert.ok(misses.length <= 2, `at most 2 of 10 missed converge.mjs's 5 s: ${misses.join(', ')}`);
    const median = sorted[Math.floor(sorted.length / 2)] ?? Infinity;
    assert.ok(median <= 5000, `the median took ${median} ms; expected within 5 s under emulation`);
  });

  test('systemctl restart loopmesh (the control plane) under load on lm-node1: no new connection refused, open connections carry on', async (t) => {
    const { load, action } = await underLoad('lm-node1', 'systemctl restart loopmesh && echo restarted');
    t.diagnostic(`restart loopmesh under load: new ok=${load.newOk} failed=${load.newFailed} (slow ${load.slow}) open=${JSON.stringify(load.open)} ${JSON.stringify(load.failures)}`);
    assert.match(action, /restarted/);
    assert.equal(load.newFailed, 0, `no new connection fails: ${JSON.stringify(load.failures)}`);
    assert.ok(load.newOk >= 20, `the load ran (${load.newOk} new connections)`);
    for (const o of load.open) assert.deepEqual([o.failed, o.sockets], [0, 1], 'each open connection carried every request on one socket');
    await eventually(async () => (await onVm('lm-node1', 'curl -sf --max-time 3 http://127.0.0.1:9190/health >/dev/null')).exitCode === 0, 120_000, 'the restarted control plane healthy');
  });

  // Under QEMU's emulation Node.js alone takes 5 to 8 s to load loopmesh: with loopmesh's default
  // 15 s handover timeout the successor did not serve in time (the VMs now set 60 s). Should it still
  // miss under emulation, what is checked is that the failed hot restart changes nothing.
  test('systemctl reload loopmesh-balancer under load is a hot restart: systemd follows the new process, nothing refused, the old one drains and exits', async (t) => {
    const before = Number(await mustOnVm('lm-node1', 'systemctl show -p MainPID --value loopmesh-balancer'));
    const since = (await mustOnVm('lm-node1', 'date +%s')).trim();
    const { load, action } = await underLoad('lm-node1', 'systemctl reload loopmesh-balancer && echo reloaded');
    t.diagnostic(`reload loopmesh-balancer under load: new ok=${load.newOk} failed=${load.newFailed} (slow ${load.slow}) open=${JSON.stringify(load.open)}; ${action.replace(/\n/g, ' ')}`);
    assert.equal(load.newFailed, 0, `no new connection fails during the hot restart: ${JSON.stringify(load.failures)}`);
    assert.ok(load.newOk >= 20, `the load ran (${load.newOk} new connections)`);
    for (const o of load.open) assert.deepEqual([o.failed, o.sockets], [0, 1], 'each open connection finished on its socket (drained by the old process)');
    assert.match(action, /reloaded/, `systemctl reload succeeded: ${action}`);
    const after = Number(await mustOnVm('lm-node1', 'systemctl show -p MainPID --value loopmesh-balancer'));
    assert.ok(after > 0 && after !== before, `systemd's main pid moved from ${before} to the successor (${after})`);
    const out = await mustOnVm('lm-node1', `echo "active $(systemctl is-active loopmesh-balancer)"
echo "user $(ps -o user= -p ${after})"
for i in $(seq 1 60); do kill -0 ${before} 2>/dev/null || break; sleep 0.5; done
echo "old $(kill -0 ${before} 2>/dev/null && echo alive || echo gone)"
echo "balancers $(pgrep -c -u loopmesh -f 'main.js balancer')"
echo "handover-errors $(journalctl -u loopmesh-balancer --since @${since} -o cat | grep -c LM_ERR_HANDOVER || true)"`);
    assert.match(out, /^active active$/m, out);
    assert.match(out, /^user loopmesh$/m, out);
    assert.match(out, /^old gone$/m, `the old balancer ${before} drained and exited: ${out}`);
    assert.match(out, /^balancers 1$/m, `one balancer process: ${out}`);
    assert.match(out, /^handover-errors 0$/m, out);
    // systemd tracks the successor for good: a plain restart stops it (no stray balancer) and starts one.
    await mustOnVm('lm-node1', 'systemctl restart loopmesh-balancer');
    const third = await mustOnVm('lm-node1', `echo "$(systemctl show -p MainPID --value loopmesh-balancer) $(pgrep -c -u loopmesh -f 'main.js balancer')"`);
    const [pid, count] = third.split(' ');
    assert.notEqual(Number(pid), after);
    assert.equal(count, '1', `one balancer process after systemctl restart: ${third}`);
    const { failed } = await curlWeb('lm-node1', 5);
    assert.equal(failed, 0);
  });

  test('a VM halted leaves the set: after vagrant halt lm-node2, lm-node1 routes web to the instance left, with no failed request', async (t) => {
    const halted = 'lm-node2';
    const left = webNodes.filter((n) => n !== halted);
    const started = Date.now();
    must(await lab(['vagrant', 'halt', halted], 600_000), `vagrant halt ${halted}`);
    const haltMs = Date.now() - started;
    const gone = await eventually(async () => {
      const web = (await routes('lm-node1')).find((r) => r.service === 'web');
      return web?.backends.length === left.length;
    }, 60_000, `web on lm-node1 down to ${left.length} backend(s)`);
    t.diagnostic(`vagrant halt ${halted}: ${haltMs} ms; lm-node1's web route had ${left.length} backend(s) ${gone} ms after`);
    const web = (await routes('lm-node1')).find((r) => r.service === 'web');
    assert.deepEqual(web?.backends.map((b) => b.address).sort(), left.map((n) => `${net}.${10 + Number(n.replace('lm-node', ''))}`).sort());
    const { failed, answered } = await curlWeb('lm-node1', 10);
    assert.equal(failed, 0);
    assert.deepEqual(answered, left.map((n) => `web-${n}`));
    if (!owned) {
      // Someone's lab: bring the VM back as it was.
      must(await lab(['vagrant', 'up', halted], 1_800_000), `vagrant up ${halted}`);
      await eventually(async () => (await curlWeb('lm-node1', 10)).answered.length === webNodes.length, 300_000, `both web instances back after vagrant up ${halted}`);
    }
  });
});
