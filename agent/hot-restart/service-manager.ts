import { execa } from 'execa';
import { codes } from '../errors.js';
import type { Logger } from '../log.js';

/**
 * Under systemd with `Type=notify` and `NotifyAccess=all` (NOTIFY_SOCKET set): tells it that this
 * process serves (READY=1) and is the unit's main process (MAINPID=). A hot restart's successor is a
 * new pid; saying so before the predecessor stops keeps systemd following the process that serves,
 * so `systemctl reload` (SIGUSR2) hands over without a gap. Node has no AF_UNIX datagram socket:
 * systemd-notify sends it, and waits until systemd has read it, so the message is not lost.
 */
export async function notifyServiceManager(log: Logger, env: NodeJS.ProcessEnv = process.env): Promise<void> {
  if (!env.NOTIFY_SOCKET) return;
  const result = await execa('systemd-notify', ['--ready', `--pid=${process.pid}`], { reject: false, timeout: 10_000, env });
  if (result.failed) {
    log.warn({ code: codes.handover, notifySocket: env.NOTIFY_SOCKET }, `systemd-notify --ready --pid=${process.pid} failed (${result.stderr || result.shortMessage}); expected systemd to take this process as the unit's main process, so a supervisor may not follow it`);
  }
}
