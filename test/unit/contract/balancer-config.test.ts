import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseBalancerConfig, type ServiceSpec } from '../../../agent/contract/balancer-config.js';
import { BalancerError, codes } from '../../../agent/errors.js';

function service(overrides: Record<string, unknown> = {}, backends: Array<Record<string, unknown>> = [{ id: 'node1/web-1', address: '10.0.0.1', port: 8080 }]): Record<string, unknown> {
  return { service: 'web', name: 'web', fqdn: 'web.local', address: '127.66.0.1', port: 80, policy: 'round-robin', empty: 'reject', backends, ...overrides };
}

function file(...services: Array<Record<string, unknown>>): string {
  return JSON.stringify({ version: 1, services });
}

test('a well-formed file loads: loopback service addresses, IP and host-name backends', () => {
  const config = parseBalancerConfig(
    file(
      service({}, [
        { id: 'n1/web-1', address: '10.0.0.1', port: 8080 },
        { id: 'n2/web-2', address: 'web-2.node.dc1.consul', port: 8080 },
        { id: 'n3/web-3', address: 'fd00::1', port: 8080 },
        // Another port of a service's address is not its listener.
        { id: 'n4/web-4', address: '127.66.0.2', port: 9999 },
      ]),
      service({ service: 'API_v2', name: 'api-v2', fqdn: 'API-V2.mesh.internal', address: '127.66.0.2', port: 443 }),
    ),
  );
  assert.deepEqual(config.services.map((s: ServiceSpec) => [s.service, s.fqdn, s.address]), [
    ['web', 'web.local', '127.66.0.1'],
    ['API_v2', 'api-v2.mesh.internal', '127.66.0.2'],
  ]);
  assert.equal(config.services[0]?.backends.length, 4);
});

test('an untrusted value is refused with a message naming the service and the value', async (t) => {
  const cases: Array<{ what: string; text: string; says: RegExp; code?: string }> = [
    { what: 'listen on every interface', text: file(service({ address: '0.0.0.0' })), says: /services\[0\]\.address: expected a loopback address inside 127\.0\.0\.0\/8.*got "0\.0\.0\.0" \(service "web"\)/ },
    { what: 'an off-host address', text: file(service({ address: '192.168.1.10' })), says: /address: expected a loopback address .*got "192\.168\.1\.10" \(service "web"\)/ },
    { what: "127/8's network address", text: file(service({ address: '127.0.0.0' })), says: /not its network or broadcast address, got "127\.0\.0\.0"/ },
    { what: "127/8's broadcast address", text: file(service({ address: '127.255.255.255' })), says: /got "127\.255\.255\.255"/ },
    { what: '127.0.0.1 (everyone else binds there)', text: file(service({ address: '127.0.0.1' })), says: /other software does not own .*got "127\.0\.0\.1" \(service "web"\)/ },
    { what: "systemd-resolved's 127.0.0.53", text: file(service({ address: '127.0.0.53' })), says: /got "127\.0\.0\.53"/ },
    { what: "systemd-resolved's 127.0.0.54", text: file(service({ address: '127.0.0.54' })), says: /got "127\.0\.0\.54"/ },
    { what: "Debian's 127.0.1.1", text: file(service({ address: '127.0.1.1' })), says: /got "127\.0\.1\.1"/ },
    { what: 'an IPv6 service address', text: file(service({ address: '::1' })), says: /expected an IPv4 address, got "::1"/ },
    { what: 'a name with a space', text: file(service({ name: 'web x' })), says: /\.name: expected a DNS label .*got "web x" \(service "web"\)/ },
    { what: 'a name with a newline', text: file(service({ name: 'web\n127.0.0.1 evil' })), says: /\.name: expected a DNS label/ },
    { what: 'an fqdn with a space', text: file(service({ fqdn: 'web .local' })), says: /\.fqdn: expected a DNS name .*got "web \.local"/ },
    { what: 'an fqdn with a hosts-file comment', text: file(service({ fqdn: 'web.local#x' })), says: /\.fqdn: expected a DNS name/ },
    { what: 'an fqdn with a newline', text: file(service({ fqdn: 'web.local\n0.0.0.0 bank.com' })), says: /\.fqdn: expected a DNS name/ },
    { what: 'an fqdn longer than 253', text: file(service({ fqdn: `${'a'.repeat(60)}.`.repeat(5) + 'local' })), says: /\.fqdn: expected a DNS name/ },
    { what: 'a service name with a newline', text: file(service({ service: 'web\nx' })), says: /\.service: expected a non-empty string without control characters/ },
    { what: 'an empty service name', text: file(service({ service: '' })), says: /\.service: expected a non-empty string/ },
    { what: 'a backend address with a newline', text: file(service({}, [{ id: 'n/w', address: '10.0.0.1\nserver evil 6.6.6.6:80', port: 80 }])), says: /backends\[0\]\.address: expected an IP address or an RFC 1123 host name, got "10\.0\.0\.1\\nserver evil.*\(service "web"\)/ },
    { what: 'a backend address with a space', text: file(service({}, [{ id: 'n/w', address: 'web 2', port: 80 }])), says: /backends\[0\]\.address: expected an IP address or an RFC 1123 host name, got "web 2"/ },
    { what: "a backend address with '#'", text: file(service({}, [{ id: 'n/w', address: 'web#2', port: 80 }])), says: /got "web#2"/ },
    { what: 'an empty backend address', text: file(service({}, [{ id: 'n/w', address: '', port: 80 }])), says: /backends\[0\]\.address: expected an IP address or an RFC 1123 host name, got ""/ },
    { what: 'a backend IPv6 address with a zone', text: file(service({}, [{ id: 'n/w', address: 'fe80::1%eth0', port: 80 }])), says: /got "fe80::1%eth0"/ },
    { what: 'a backend id with a newline', text: file(service({}, [{ id: 'n/w\nx', address: '10.0.0.1', port: 80 }])), says: /backends\[0\]\.id: expected a non-empty string without control characters/ },
    { what: 'a backend port out of range', text: file(service({}, [{ id: 'n/w', address: '10.0.0.1', port: 70000 }])), says: /backends\[0\]\.port: expected an integer from 1 to 65535, got number 70000/ },
    {
      what: 'a backend that is its own listener',
      text: file(service({}, [{ id: 'n/loop', address: '127.66.0.1', port: 80 }])),
      says: /service "web" has the backend n\/loop at 127\.66\.0\.1:80, which is the listener of service "web".*loop/,
      code: codes.balancerSelfBackend,
    },
    {
      what: "a backend that is another service's listener",
      text: file(service({}, [{ id: 'n/db', address: '127.66.0.2', port: 5432 }]), service({ service: 'db', name: 'db', fqdn: 'db.local', address: '127.66.0.2', port: 5432 })),
      says: /service "web" has the backend n\/db at 127\.66\.0\.2:5432, which is the listener of service "db"/,
      code: codes.balancerSelfBackend,
    },
    {
      what: 'a listener written as an IPv4-mapped IPv6 address',
      text: file(service({}, [{ id: 'n/mapped', address: '::ffff:127.66.0.1', port: 80 }])),
      says: /backend n\/mapped at ::ffff:127\.66\.0\.1:80, which is the listener of service "web"/,
      code: codes.balancerSelfBackend,
    },
    { what: 'an unknown policy', text: file(service({ policy: 'fastest' })), says: /\.policy: expected one of p2c-ewma, least-conn, round-robin, got "fastest" \(service "web"\)/ },
    { what: 'a negative weight', text: file(service({}, [{ id: 'n/w', address: '10.0.0.1', port: 80, weight: -1 }])), says: /backends\[0\]\.weight: expected an integer from 0 to 65535, got number -1/ },
    { what: 'a split that does not add up to 100', text: file(service({ split: [{ name: 'canary', weight: 20 }, { name: '', weight: 70 }] })), says: /\.split: expected weights that add up to 100, got 90/ },
    { what: 'a split subset twice', text: file(service({ split: [{ name: 'a', weight: 50 }, { name: 'a', weight: 50 }] })), says: /\.split: expected each subset once/ },
    { what: 'a split weight over 100', text: file(service({ split: [{ name: 'a', weight: 150 }] })), says: /\.split\[0\]\.weight: expected an integer from 0 to 100, got number 150/ },
    { what: 'a negative connection limit', text: file(service({ limits: { maxConnections: -5 } })), says: /\.limits\.maxConnections: expected an integer from 0 to 1000000, got number -5/ },
    { what: 'an unknown drain policy', text: file(service({ limits: { drain: 'later' } })), says: /\.limits\.drain: expected one of keep, drain, reset, got "later"/ },
    { what: 'a panic threshold over 100%', text: file(service({ outlier: { panicThresholdPercent: 101 } })), says: /\.outlier\.panicThresholdPercent: expected an integer from 0 to 100, got number 101/ },
  ];
  for (const c of cases) {
    await t.test(c.what, () => {
      assert.throws(
        () => parseBalancerConfig(c.text, '/run/loopmesh/balancer.json'),
        (err: unknown) => {
          assert.ok(err instanceof BalancerError);
          assert.equal(err.code, c.code ?? codes.balancerConfig);
          assert.match(err.message, c.says);
          assert.ok(err.message.startsWith('/run/loopmesh/balancer.json'), err.message);
          return true;
        },
      );
    });
  }
});

test('weights, subsets, a split, limits and outlier settings load; absent ones take their defaults', () => {
  const config = parseBalancerConfig(file(
    service({ policy: 'least-conn', split: [{ name: 'canary', weight: 5 }, { name: '', weight: 95 }], limits: { maxConnections: 100, queue: 10, drain: 'reset' }, outlier: { consecutiveFailures: 5 } }, [
      { id: 'n/a', address: '10.0.0.1', port: 80, weight: 9, subset: 'canary' },
      { id: 'n/b', address: '10.0.0.2', port: 80 },
    ]),
    service({ service: 'db', name: 'db', fqdn: 'db.local', address: '127.66.0.2', port: 5432, policy: undefined }),
  ));
  const [web, db] = config.services;
  assert.deepEqual(web?.backends.map((b) => [b.weight, b.subset]), [[9, 'canary'], [1, '']]);
  assert.deepEqual([web?.policy, web?.split, web?.limits, web?.outlier], ['least-conn', [{ name: 'canary', weight: 5 }, { name: '', weight: 95 }], { maxConnections: 100, queue: 10, drain: 'reset' }, { consecutiveFailures: 5 }]);
  assert.deepEqual([db?.policy, db?.split, db?.limits], ['p2c-ewma', undefined, undefined]);
});

test('one bad service refuses the whole file, so nothing of it is applied', () => {
  assert.throws(() => parseBalancerConfig(file(service(), service({ service: 'evil', name: 'evil', fqdn: 'evil.local', address: '0.0.0.0', port: 22 }))), /got "0\.0\.0\.0" \(service "evil"\)/);
});
