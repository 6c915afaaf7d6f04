import { test } from 'node:test';
import assert from 'node:assert/strict';
import { prometheusText } from '../../../agent/admin/metrics.js';
import { routeReport } from '../../../agent/admin/report.js';
import { blackHoleBackend, config, deadBackend, freePort, service, servedBy, startBackend, startBalancer, status } from './tcp.js';

// The proxy cluster as the last resort: real sockets, a "gateway" here is any listener (the contract
// puts gateways outside 127/8; the balancer itself dials what it is given).

test('every backend refuses: the connection goes through a gateway, after the retries; the status counts it', async (t) => {
  const dead1 = await deadBackend('dead1');
  const dead2 = await deadBackend('dead2');
  const gateway = await startBackend(t, 'gw');
  const address = '127.66.9.1';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  const spec = service('web', address, port, [dead1, dead2], { gateways: [{ ...gateway.spec, id: 'gw' }] });
  await balancer.apply(config(spec));

  assert.equal(await servedBy(t, address, port), 'gw');
  const web = status(balancer, 'web');
  assert.equal(web.gatewayConnections, 1);
  assert.equal(web.retries, 2, 'both backends were tried before the gateway');
  assert.deepEqual(web.backends.map((b) => b.failedConnects), [1, 1]);
  assert.deepEqual(web.gateways.map((g) => [g.id, g.totalConnections]), [['gw', 1]]);
  // What the admin shows: /v1/routes lists the gateways, /metrics counts the connections.
  const report = routeReport({ node: 'n1', consul: null, lastRenderAt: undefined, specs: [spec], served: balancer.snapshot(), problems: [], health: { status: 'ok', reasons: [] }, dns: undefined });
  assert.deepEqual(report.routes[0]?.gateways.map((g) => [g.id, g.totalConnections]), [['gw', 1]]);
  const metrics = await prometheusText(report);
  assert.match(metrics, /^loopmesh_route_gateway_connections_total\{service="web"\} 1$/m);
  // Both backends failed for one connection: the service counts as cut off from here for a back-off.
  assert.match(metrics, /^loopmesh_route_unreachable\{service="web"\} 1$/m);
});

test('while every backend is down (a partition), new connections go to a gateway first, without paying the connect timeouts', async (t) => {
  const hole1 = await blackHoleBackend(t, 'hole1');
  const hole2 = await blackHoleBackend(t, 'hole2');
  const gateway = await startBackend(t, 'gw');
  const address = '127.66.9.2';
  const port = await freePort(address);
  const balancer = startBalancer(t, { connectTimeoutMs: 300 });
  await balancer.apply(config(service('web', address, port, [hole1, hole2], { gateways: [gateway.spec] })));

  // One connection that tried every backend in vain (and paid both timeouts) is enough.
  assert.equal(await servedBy(t, address, port), 'gw');
  assert.equal(status(balancer, 'web').unreachable, true);
  const before = status(balancer, 'web').backends.map((b) => b.failedConnects);
  const started = performance.now();
  for (let i = 0; i < 5; i++) assert.equal(await servedBy(t, address, port), 'gw');
  const elapsed = performance.now() - started;
  assert.deepEqual(status(balancer, 'web').backends.map((b) => b.failedConnects), before, 'no direct connect was tried meanwhile');
  assert.ok(elapsed < 1500, `five connections through the gateway took ${elapsed.toFixed(0)} ms, not 5 x 2 x 300 ms of timeouts`);
  assert.equal(status(balancer, 'web').gatewayConnections, 6);
});

test('a backend that answers again takes the traffic back once its back-off ends; the gateway is not used meanwhile', async (t) => {
  const dead = await deadBackend('web-1');
  const gateway = await startBackend(t, 'gw');
  const address = '127.66.9.3';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  // A short back-off so that the test sees the hand-back.
  await balancer.apply(config(service('web', address, port, [dead], { gateways: [gateway.spec], outlier: { baseEjectionMs: 300, maxEjectionMs: 300 } })));
  for (let i = 0; i < 3; i++) assert.equal(await servedBy(t, address, port), 'gw');
  assert.equal(status(balancer, 'web').unreachable, true);

  // The instance comes back on the same port (the partition heals).
  const { createServer } = await import('node:net');
  const back = createServer((s) => s.end('web-1\n'));
  back.listen(dead.port, '127.0.0.1');
  t.after(() => back.close());
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(await servedBy(t, address, port), 'web-1');
  assert.equal(status(balancer, 'web').unreachable, false);
  for (let i = 0; i < 3; i++) assert.equal(await servedBy(t, address, port), 'web-1');
  assert.equal(status(balancer, 'web').gatewayConnections, 3);
});

test('a gateway that refuses is skipped for the next one; with every backend and gateway down the client is closed and counted', async (t) => {
  const dead = await deadBackend('web-1');
  const deadGateway = await deadBackend('gw-dead');
  const gateway = await startBackend(t, 'gw-2');
  const address = '127.66.9.4';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [dead], { gateways: [deadGateway, gateway.spec] })));
  for (let i = 0; i < 4; i++) assert.equal(await servedBy(t, address, port), 'gw-2');

  await gateway.close();
  const { connect } = await import('node:net');
  const socket = connect({ host: address, port });
  const ended = await new Promise<string>((resolve) => {
    let got = '';
    socket.on('data', (c) => (got += String(c)));
    socket.on('close', () => resolve(got));
    socket.on('error', () => undefined);
  });
  assert.equal(ended, '', 'closed without a byte');
  assert.equal(status(balancer, 'web').failedConnections, 1);
});

test('without gateways nothing changes: every backend down closes the client', async (t) => {
  const dead = await deadBackend('web-1');
  const address = '127.66.9.5';
  const port = await freePort(address);
  const balancer = startBalancer(t);
  await balancer.apply(config(service('web', address, port, [dead])));
  const { connect } = await import('node:net');
  for (let i = 0; i < 4; i++) {
    const socket = connect({ host: address, port });
    socket.on('error', () => undefined);
    await new Promise((resolve) => socket.on('close', resolve));
  }
  const web = status(balancer, 'web');
  assert.equal(web.failedConnections, 4);
  assert.equal(web.gatewayConnections, 0);
  assert.deepEqual(web.gateways, []);
});
