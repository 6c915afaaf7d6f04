import { isIP } from 'node:net';
import { isLoopbackHost } from '../config/config.js';
import { describe } from '../validate.js';

/** Where a request to the admin port arrived, as the socket and the config say. */
export interface AdminRequestSite {
  /** The Host header; undefined when the client sent none (HTTP/1.0). */
  host: string | undefined;
  /** The --admin address (an IP literal or localhost). */
  adminHost: string;
  /** The port the admin server listens on. */
  adminPort: number;
  /** The socket's local address: the address the client used (meaningful when bound to 0.0.0.0 or ::). */
  localAddress: string | undefined;
  /** The socket's remote address. */
  peer: string | undefined;
}

const hostHeader = /^(\[[0-9A-Fa-f:.]+\]|[^:[\]\s]+)(?::(\d{1,5}))?$/;

const bare = (host: string): string => host.toLowerCase().replace(/^\[(.*)\]$/, '$1').replace(/^::ffff:(?=\d+\.)/, '');

/**
 * Why a request must be refused with 421, or undefined when its Host is this admin address (with
 * its port) or a loopback name. A page that rebinds its own DNS name to 127.0.0.1 still sends that
 * name as Host, so it is refused. Loopback names pass with any port: only this host can send them,
 * and an SSH tunnel (localhost:8080 -> 127.0.0.1:9190) keeps working.
 */
export function misdirected(site: AdminRequestSite): string | undefined {
  const anyAddress = site.adminHost === '0.0.0.0' || site.adminHost === '::';
  const ours = anyAddress ? `an address of this node with port ${site.adminPort}` : `${isIP(site.adminHost) === 6 ? `[${site.adminHost}]` : site.adminHost}:${site.adminPort}`;
  const expected = `expected ${ours}, localhost or 127.0.0.1`;
  if (site.host === undefined || site.host === '') {
    if (site.peer !== undefined && isLoopbackHost(site.peer)) return undefined;
    return `no Host header from ${site.peer ?? 'an unknown peer'}; ${expected}`;
  }
  const match = hostHeader.exec(site.host);
  if (match?.[1] !== undefined) {
    const name = bare(match[1]);
    const port = match[2] === undefined ? undefined : Number(match[2]);
    if (isIP(name) !== 0 || name === 'localhost') {
      if (isLoopbackHost(name)) return undefined;
      const here = name === bare(site.adminHost) || (site.localAddress !== undefined && name === bare(site.localAddress));
      if (here && (port ?? 80) === site.adminPort) return undefined;
    }
  }
  return `Host ${describe(site.host)} is not this admin address; ${expected}`;
}
