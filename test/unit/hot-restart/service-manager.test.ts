import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { execa } from 'execa';
import { notifyServiceManager } from '../../../agent/hot-restart/service-manager.js';
import { captureLogger } from '../../support/log.js';

// The message itself reaches systemd in the Vagrant lab (test/vagrant: `systemctl reload
// loopmesh-balancer` moves the unit's main pid to the successor); here, what happens around it.

test('notifyServiceManager: nothing without NOTIFY_SOCKET (not under systemd)', async () => {
  const { logger, lines } = captureLogger();
  await notifyServiceManager(logger, { PATH: process.env.PATH });
  assert.deepEqual(lines, []);
});

test('notifyServiceManager: a notify socket nobody listens on is a warning naming it, not a crash', async (t) => {
  if ((await execa('systemd-notify', ['--help'], { reject: false })).exitCode !== 0) return t.skip('systemd-notify is not installed (package systemd)');
  const socket = join(tmpdir(), `loopmesh-no-such-notify-${process.pid}.sock`);
  const { logger, lines } = captureLogger();
  await notifyServiceManager(logger, { PATH: process.env.PATH, NOTIFY_SOCKET: socket });
  assert.equal(lines.length, 1, JSON.stringify(lines));
  assert.equal(lines[0]?.code, 'LM_ERR_HANDOVER');
  assert.equal(lines[0]?.notifySocket, socket);
  assert.match(lines[0]?.msg ?? '', new RegExp(`systemd-notify --ready --pid=${process.pid} failed`));
});
