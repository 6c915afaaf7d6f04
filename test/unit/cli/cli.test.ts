import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';

const main = join(import.meta.dirname, '..', '..', '..', 'agent', 'cli', 'main.ts');
const cli = (...args: string[]) => execa('node', ['--import', 'tsx', main, ...args], { reject: false, env: { CONSUL_HTTP_ADDR: '', LOOPMESH_ADMIN: '' } });

test('bad flags and values: one line naming them, exit status 2', async () => {
  const cases: [string[], RegExp][] = [
    [['agent', '--colour', 'blue'], /^loopmesh: unknown flag --colour; expected one of --help, --config, --consul/],
    [['agent', '--gateway-range', '10.77.77.128/27'], /^loopmesh: unknown flag --gateway-range; expected one of/],
    [['gateway'], /^loopmesh: loopmesh gateway: --gateway-range \(LOOPMESH_GATEWAY_RANGE\) is required; expected the CIDR range/],
    [['gateway', '--gateway-range', '10.77.77.128/27', '--admin', 'off'], /^loopmesh: loopmesh gateway: --admin is off and no --gateway-check is given; expected one of them/],
    [['gateway', '--gateway-range', '10.77.77.128/27', '--dns', '127.0.0.1:53'], /^loopmesh: unknown flag --dns; expected one of/],
    [['gateway', '--gateway-range', '127.1.0.0/24'], /^loopmesh: --gateway-range: expected a range of unicast addresses other nodes can reach .*"127\.1\.0\.0\/24"$/],
    [['agent', '--dns', 'nowhere'], /^loopmesh: --dns: expected ADDRESS:PORT .* got "nowhere", or "off"$/],
    [['agent', '--range', '192.168.0.0/16'], /^loopmesh: --range: expected a CIDR range inside 127\.0\.0\.0\/8 .*"192\.168\.0\.0\/16"$/],
    [['agent', '--log-level', 'chatty'], /^loopmesh: --log-level: expected one of .* got "chatty"$/],
    [['agent', '--config', '/nonexistent/loopmesh.json'], /^loopmesh: config file \/nonexistent\/loopmesh\.json: cannot read it \(ENOENT\)$/],
    [['agent', 'extra'], /^loopmesh: unexpected argument "extra"; expected only flags$/],
    [['agent', '--consul'], /^loopmesh: flag --consul expects a value$/],
    [['frobnicate'], /^loopmesh: unknown command "frobnicate"; expected agent, gateway, status, render, balancer or doctor$/],
    [['render'], /^loopmesh: render: expected --dry-run/],
    [['status', '--admin', 'x'], /^loopmesh: --admin: expected ADDRESS:PORT/],
    [['agent', '--dns', '1.2.3:99'], /^loopmesh: --dns: expected an IP address before the port .* got "1\.2\.3" in "1\.2\.3:99"$/],
    [['agent', '--templates', '/nonexistent/tpl', '--run-dir', join(tmpdir(), 'loopmesh-cli-templates'), '--dns', 'off', '--admin', 'off', '--hosts-file', 'off'], /^loopmesh: --templates: cannot read the folder "\/nonexistent\/tpl" \(ENOENT\); expected a folder holding NAME\.hbs templates$/],
  ];
  await Promise.all(
    cases.map(async ([args, pattern]) => {
      const r = await cli(...args);
      assert.equal(r.exitCode, 2, `${args.join(' ')}: exit ${r.exitCode}, stderr ${r.stderr}`);
      assert.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')}: one line, got ${r.stderr}`);
      assert.match(r.stderr.trim(), pattern, args.join(' '));
    }),
  );
});

test('--help everywhere, exit 0, naming the flags', async () => {
  const cases: [string[], RegExp][] = [
    [['--help'], /Commands:[\s\S]*agent[\s\S]*status[\s\S]*render/],
    [['agent', '--help'], /--consul URL[\s\S]*CONSUL_HTTP_ADDR[\s\S]*--token-file[\s\S]*--hosts-file[\s\S]*--dns[\s\S]*--admin[\s\S]*--suffix[\s\S]*--range[\s\S]*--log-level/],
    [['status', '--help'], /Usage: loopmesh status/],
    [['render', '--help'], /--dry-run/],
    [['balancer', '--help'], /--run-dir[\s\S]*--gateway-range CIDR/],
    [['gateway', '--help'], /Usage: loopmesh gateway --gateway-range CIDR[\s\S]*ip route add local[\s\S]*--gateway-check URL/],
  ];
  await Promise.all(
    cases.map(async ([args, pattern]) => {
      const r = await cli(...args);
      assert.equal(r.exitCode, 0, args.join(' '));
      assert.match(r.stdout, pattern, args.join(' '));
    }),
  );
});

test('status against no agent: a clear message and exit 1', async () => {
  const r = await cli('status', '--admin', '127.0.0.1:1');
  assert.equal(r.exitCode, 1);
  assert.match(r.stderr, /cannot read http:\/\/127\.0\.0\.1:1\/v1\/routes .* is the agent running with --admin 127\.0\.0\.1:1\?/);
});

test('status: the admin answer is checked; an agent without health, and control characters, print safely', async () => {
  const { parseStatusReport, statusTable } = await import('../../../agent/cli/status.js');
  const older = {
    node: 'n1',
    consul: { connected: true, errors: {} },
    dataPlane: 'in-process',
    routes: [{ service: 'web', name: 'web', fqdn: 'web.local', address: '127.77.0.1', port: 80, listening: true, healthyBackends: 2, backends: [] }],
    problems: [{ code: 'LM_ERR_PLAN_INVALID_NAME', message: 'service "\u001b]0;pwned\u0007" cannot be a DNS label' }],
  };
  const text = statusTable(parseStatusReport(older));
  assert.match(text, /health unknown/);
  assert.match(text, /web\.local\s+127\.77\.0\.1:80/);
  assert.doesNotMatch(text, /\u001b|\u0007/, 'no raw escape reaches the terminal');
  assert.match(text, /\\u001b\]0;pwned\\u0007/);
  assert.throws(() => parseStatusReport([]), /\/v1\/routes: expected an object, got an array/);
  assert.throws(() => parseStatusReport({ consul: {}, routes: 'x' }), /routes: expected an array/);
});
