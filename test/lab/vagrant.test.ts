import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { consulBinary } from '../support/consul.js';

// The Vagrant path of the lab can't boot VMs here; what can be checked is: Vagrant accepts the
// Vagrantfile, the provisioning scripts parse, Consul accepts the configs they write, and systemd
// accepts the units.

const repo = join(import.meta.dirname, '..', '..');
const provision = join(repo, 'scripts', 'provision');

/** Vagrant and the libvirt provider the lab defaults to: without a usable provider `vagrant validate` refuses to run. */
async function ensureVagrant(): Promise<void> {
  const installed = async (pkg: string): Promise<boolean> => (await execa('dpkg-query', ['-W', '-f=${Status}', pkg], { reject: false })).stdout.includes('install ok installed');
  if ((await execa('vagrant', ['--version'], { reject: false })).exitCode === 0 && (await installed('vagrant-libvirt'))) return;
  if (process.getuid?.() !== 0) throw new Error('vagrant and its libvirt provider are not installed and this is not root: sudo apt-get install -y vagrant vagrant-libvirt');
  await execa('apt-get', ['update', '-qq']);
  await execa('apt-get', ['install', '-y', '-qq', '--no-install-recommends', 'vagrant', 'vagrant-libvirt'], { env: { DEBIAN_FRONTEND: 'noninteractive' } });
}

describe('the Vagrant lab (vagrant/Vagrantfile, scripts/provision)', { timeout: 300_000 }, () => {
  test('vagrant validate passes, for the default two client nodes and for NODES=3; a bad NODES is refused', async () => {
    await ensureVagrant();
    const cwd = join(repo, 'vagrant');
    for (const nodes of [undefined, '3']) {
      const r = await execa('vagrant', ['validate'], { cwd, reject: false, env: nodes ? { NODES: nodes } : {} });
      assert.equal(r.exitCode, 0, `vagrant validate (NODES=${nodes ?? 'default'}): ${r.stdout}\n${r.stderr}`);
      assert.match(r.stdout, /validated successfully/);
    }
    const bad = await execa('vagrant', ['validate'], { cwd, reject: false, env: { NODES: '0' } });
    assert.notEqual(bad.exitCode, 0);
    assert.match(`${bad.stdout}${bad.stderr}`, /NODES must be from 1 to 20/);
  });

  test('every provisioning script parses (bash -n) and has set -euo pipefail', async () => {
    const scripts = (await readdir(provision)).filter((f) => f.endsWith('.sh')).map((f) => join(provision, f));
    scripts.push(join(repo, 'scripts', 'lab.sh'));
    assert.ok(scripts.length >= 6);
    for (const s of scripts) {
      const r = await execa('bash', ['-n', s], { reject: false });
      assert.equal(r.exitCode, 0, `bash -n ${s}: ${r.stderr}`);
      if (!s.endsWith('lib.sh')) assert.match(await execa('cat', [s]).then((x) => x.stdout), /^set -euo pipefail$/m, `${s} sets -euo pipefail`);
    }
  });

  test("Consul accepts the server and client configs the provisioning writes (consul validate)", async () => {
    const consul = await consulBinary();
    const dir = await mkdtemp(join(tmpdir(), 'loopmesh-provision-'));
    try {
      for (const role of ['server', 'client']) {
        const d = join(dir, role);
        await execa('mkdir', ['-p', d]);
        const hcl = await execa('bash', ['-c', `. "${provision}/lib.sh" && lm_consul_hcl ${role} lm-${role} 10.77.77.11 10.77.77.10 ${join(dir, 'data')} "127.0.0.1 10.77.77.11"`]);
        await writeFile(join(d, 'consul.hcl'), hcl.stdout);
        const r = await execa(consul, ['validate', d], { reject: false });
        assert.equal(r.exitCode, 0, `consul validate (${role}): ${r.stdout}${r.stderr}`);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('systemd accepts the loopmesh units (systemd-analyze verify), which run unprivileged with only CAP_NET_BIND_SERVICE', async (t) => {
    const units = ['loopmesh.service', 'loopmesh-balancer.service', 'loopmesh-gateway.service'].map((u) => join(provision, 'systemd', u));
    const text = await Promise.all(units.map((u) => execa('cat', [u]).then((r) => r.stdout)));
    for (const unit of text) {
      assert.match(unit, /^User=loopmesh$/m);
      assert.match(unit, /^Restart=on-failure$/m);
      assert.match(unit, /^NoNewPrivileges=yes$/m);
      assert.match(unit, /^ProtectSystem=strict$/m);
    }
    assert.match(text[1] ?? '', /^AmbientCapabilities=CAP_NET_BIND_SERVICE$/m);
    assert.match(text[1] ?? '', /^CapabilityBoundingSet=CAP_NET_BIND_SERVICE$/m);
    assert.match(text[1] ?? '', /^ReadWritePaths=\/etc\/hosts$/m);
    assert.match(text[0] ?? '', /^CapabilityBoundingSet=$/m);
    // The gateway: unprivileged too; only its route (AnyIP, the range made local) is added as root before the start.
    assert.match(text[2] ?? '', /^CapabilityBoundingSet=CAP_NET_BIND_SERVICE$/m);
    assert.match(text[2] ?? '', /^ExecStartPre=\+\/sbin\/ip route replace local \$\{LOOPMESH_GATEWAY_RANGE\} dev lo$/m);
    assert.match(text[2] ?? '', /^ExecStart=.* gateway$/m);
    if ((await execa('systemd-analyze', ['--version'], { reject: false })).exitCode !== 0) {
      t.diagnostic('systemd-analyze is not installed: unit files checked by content only');
      return;
    }
    const r = await execa('systemd-analyze', ['verify', ...units], { reject: false });
    assert.equal(r.exitCode, 0, `systemd-analyze verify: ${r.stdout}${r.stderr}`);
  });
});
