import { execa } from 'execa';

/** `dig @host -p port NAME TYPE`: status and the data of the ANSWER section's records. */
export async function dig(server: { host: string; port: number }, name: string, type = 'A', extra: string[] = []): Promise<{ status: string; answers: string[]; flags: string }> {
  const r = await execa('dig', [`@${server.host}`, '-p', String(server.port), name, type, '+time=2', '+tries=1', ...extra], { reject: false });
  const status = /status: (\w+)/.exec(r.stdout)?.[1] ?? `no answer (${r.stdout.split('\n').find((l) => l.includes(';;')) ?? r.stderr})`;
  const flags = /flags: ([^;]*);/.exec(r.stdout)?.[1] ?? '';
  const section = /;; ANSWER SECTION:\n([\s\S]*?)(?:\n\n|$)/.exec(r.stdout)?.[1] ?? '';
  const answers = section
    .split('\n')
    .filter((l) => l && !l.startsWith(';') && /\sIN\s/.test(l))
    .map((l) => l.split(/\s+/).slice(4).join(' '));
  return { status, answers, flags };
}

/** Runs a command in a private mount namespace where `hostsFile` is /etc/hosts: a real resolver lookup. */
export async function withHostsFile(hostsFile: string, command: string): Promise<{ stdout: string; exitCode: number }> {
  const r = await execa('unshare', ['--mount', 'sh', '-c', `mount --bind "${hostsFile}" /etc/hosts && ${command}`], { reject: false });
  return { stdout: r.stdout.trim(), exitCode: r.exitCode ?? -1 };
}

/** Whether this host lets us make a mount namespace (root on Linux). */
export async function canUnshare(): Promise<boolean> {
  const r = await execa('unshare', ['--mount', 'true'], { reject: false });
  return r.exitCode === 0;
}
