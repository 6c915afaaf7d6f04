import { codes, type Problem } from '../errors.js';

/** The loopmesh block of a hosts file, and the lines that may go in it: pure text functions. */

export const beginMarker = '# BEGIN loopmesh (managed by loopmesh; edits inside this block are overwritten)';
export const endMarker = '# END loopmesh';

/** Who wrote a block: the agent's run dir (real path) and its process id, on the BEGIN line. */
export interface BlockOwner {
  owner: string;
  pid: number;
}

/** Lines with their own terminators, so joining them gives back the text byte for byte. */
function splitLines(text: string): string[] {
  return text.match(/[^\n]*\n|[^\n]+$/g) ?? [];
}

const isBegin = (line: string): boolean => /^# BEGIN loopmesh(\s|$)/.test(line.trimEnd());
const isEnd = (line: string): boolean => line.trimEnd() === endMarker;

/** The BEGIN line; the owner is a JSON string so that any path (spaces, quotes) reads back exactly. */
export function beginLine(owner?: BlockOwner): string {
  return owner ? `${beginMarker} owner=${JSON.stringify(owner.owner)} pid=${owner.pid}` : beginMarker;
}

/** The owner on a BEGIN line, or undefined for a marker without one (loopmesh before owners) or a garbled one. */
export function parseBlockOwner(line: string): BlockOwner | undefined {
  if (!isBegin(line)) return undefined;
  const match = /\sowner=("(?:[^"\\]|\\.)*")\s+pid=(\d{1,10})\s*$/.exec(line);
  if (!match?.[1] || !match[2]) return undefined;
  let owner: unknown;
  try {
    owner = JSON.parse(match[1]);
  } catch {
    return undefined;
  }
  const pid = Number(match[2]);
  // pid 0 or below would make process.kill(pid, 0) probe a whole process group.
  if (typeof owner !== 'string' || owner === '' || !Number.isSafeInteger(pid) || pid <= 0) return undefined;
  return { owner, pid };
}

/**
 * [start, end) line ranges of the complete blocks: each END closes the nearest BEGIN above it. A
 * stray BEGIN or END is left alone rather than guessed at, so no line outside a block is ever lost.
 */
function findBlocks(lines: string[]): Array<[number, number]> {
  const blocks: Array<[number, number]> = [];
  let begin = -1;
  lines.forEach((line, i) => {
    if (isBegin(line)) begin = i;
    else if (isEnd(line) && begin >= 0) {
      blocks.push([begin, i + 1]);
      begin = -1;
    }
  });
  return blocks;
}

/** The owner of each complete block in the file (undefined: a block with no owner on its marker). */
export function blockOwners(text: string): Array<BlockOwner | undefined> {
  const all = splitLines(text);
  return findBlocks(all).map(([start]) => parseBlockOwner((all[start] ?? '').trimEnd()));
}

function lineEnding(text: string): string {
  const newline = text.indexOf('\n');
  return newline > 0 && text[newline - 1] === '\r' ? '\r\n' : '\n';
}

function renderBlock(lines: string, eol: string, owner: BlockOwner | undefined): string {
  const body = lines.split(/\r?\n/).filter((line) => !isBegin(line) && !isEnd(line));
  while (body.length > 0 && body[body.length - 1] === '') body.pop();
  return [beginLine(owner), ...body, endMarker].map((line) => line + eol).join('');
}

function replaceBlocks(lines: string[], blocks: Array<[number, number]>, replacement: string): string {
  let out = '';
  let at = 0;
  blocks.forEach(([start, end], i) => {
    out += lines.slice(at, start).join('') + (i === 0 ? replacement : '');
    at = end;
  });
  return out + lines.slice(at).join('');
}

/**
 * Puts `lines` in the loopmesh block: in place of the existing block (a duplicate block is removed),
 * or appended. Everything outside the block stays exactly as it was; the block uses the file's line
 * ending. With `owner`, the BEGIN line names it.
 */
export function spliceHostsBlock(original: string, lines: string, owner?: BlockOwner): string {
  const eol = lineEnding(original);
  const block = renderBlock(lines, eol, owner);
  const all = splitLines(original);
  const blocks = findBlocks(all);
  if (blocks.length > 0) return replaceBlocks(all, blocks, block);
  const separator = original === '' || original.endsWith('\n') ? '' : eol;
  return original + separator + block;
}

/** Takes out the loopmesh blocks; with `owner`, only the blocks that owner wrote. */
export function removeHostsBlock(original: string, options: { owner?: string } = {}): string {
  const all = splitLines(original);
  const owner = options.owner;
  const blocks = findBlocks(all).filter(([start]) => owner === undefined || parseBlockOwner((all[start] ?? '').trimEnd())?.owner === owner);
  return replaceBlocks(all, blocks, '');
}

const ipv4Pattern = /^(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})$/;
const labelPattern = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i;

/** Dotted quad inside 127.0.0.0/8; leading zeros are refused since the resolver reads 0127 as octal. */
function isLoopbackIPv4(address: string): boolean {
  const octets = ipv4Pattern.exec(address)?.slice(1).map(Number);
  return octets !== undefined && octets.every((o) => o <= 255) && octets[0] === 127;
}

/** RFC 1123 host name; the last label not all digits, so that it cannot read as an address. */
function isHostName(name: string): boolean {
  if (name.length === 0 || name.length > 253) return false;
  const labels = name.split('.');
  return labels.every((label) => labelPattern.test(label)) && !/^\d+$/.test(labels[labels.length - 1] ?? '');
}

export interface HostsLinesCheck {
  /** The lines that passed, joined with "\n". */
  text: string;
  /** Each line dropped, with the problem that says why. */
  dropped: Array<{ line: string; problem: Problem }>;
}

/** Long enough to recognise a line in a log, short enough that a megabyte line does not flood it. */
function clip(line: string): string {
  return line.length > 200 ? `${line.slice(0, 200)}...` : line;
}

/** What a line may hold besides loopback addresses: each name's gateway addresses (from the served balancer.json). */
export interface HostsLineRules {
  suffix?: string;
  /** Lower-case name -> the gateway addresses it may also resolve to, after its loopback line. */
  gateways?: ReadonlyMap<string, ReadonlySet<string>>;
}

function lineFault(line: string, rules: HostsLineRules, named: Set<string>): string | undefined {
  // Tab is a field separator in hosts files; every other control character is refused.
  if (/[\u0000-\u0008\u000a-\u001f\u007f]/.test(line)) return 'it holds a control character';
  const trimmed = line.trim();
  if (trimmed === '') return undefined;
  if (/^#\s*(BEGIN|END) loopmesh/i.test(trimmed)) return 'it is a loopmesh marker line, which would split the block';
  if (trimmed.startsWith('#')) return undefined;
  const [address = '', ...names] = trimmed.split(/[ \t]+/);
  const loopback = isLoopbackIPv4(address);
  if (!loopback && !ipv4Pattern.test(address)) return `address ${JSON.stringify(clip(address))} is not an IPv4 address`;
  if (names.length === 0) return 'it has an address and no name';
  for (const name of names) {
    if (!isHostName(name)) return `name ${JSON.stringify(clip(name))} is not a DNS host name`;
    if (rules.suffix && !name.toLowerCase().endsWith(`.${rules.suffix.toLowerCase()}`)) return `name ${JSON.stringify(name)} is not under .${rules.suffix}`;
    if (loopback) continue;
    // A gateway line: only an address the served config gives the name, and only after its loopback
    // line (so that the node's own data plane is always tried first).
    if (!rules.gateways?.get(name.toLowerCase())?.has(address)) return `address ${JSON.stringify(clip(address))} is outside 127.0.0.0/8 and not a gateway of ${name} in the served balancer.json`;
    if (!named.has(name.toLowerCase())) return `gateway address ${address} comes before the loopback line of ${name}`;
  }
  if (loopback) for (const name of names) named.add(name.toLowerCase());
  return undefined;
}

/** Loopback lines lineFault found good, by suffix and line: their names (lower case). Bounded: cleared when full. */
const goodLoopbackLines = new Map<string, string[]>();
const maxGoodLines = 200_000;

function namesOf(line: string): string[] {
  return line.trim().split(/[ \t]+/).slice(1).map((n) => n.toLowerCase());
}

/** A good line whose verdict depends on nothing but itself and the suffix: a loopback address line (not a comment, a blank or a gateway line). */
function goodLoopbackLine(line: string): boolean {
  const trimmed = line.trim();
  return trimmed !== '' && !trimmed.startsWith('#') && isLoopbackIPv4(trimmed.split(/[ \t]+/)[0] ?? '');
}

/**
 * Keeps the lines of a rendered hosts file (the run dir's `hosts`, untrusted: whoever can write the
 * run dir would otherwise write /etc/hosts as root) that are comments, blank, or `ADDRESS NAME
 * [NAME...]` with ADDRESS in 127.0.0.0/8 and each NAME a host name (under `suffix` when given), and
 * after a name's loopback line, lines that give it one of its gateway addresses (`gateways`).
 * Every other line is dropped, with an LM_ERR_HOSTS_INVALID_LINE problem naming it.
 */
export function checkHostsLines(rendered: string, options: HostsLineRules = {}): HostsLinesCheck {
  const kept: string[] = [];
  const dropped: HostsLinesCheck['dropped'] = [];
  const under = options.suffix ? ` under .${options.suffix}` : '';
  const named = new Set<string>();
  const lines = rendered.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  const suffix = options.suffix ?? '';
  lines.forEach((raw, i) => {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    // A loopback line found good before (the same suffix) is good whatever else changed: thousands
    // of unchanged lines are not checked again on every change.
    const key = `${suffix}\u0000${line}`;
    const good = goodLoopbackLines.get(key);
    if (good !== undefined) {
      for (const name of good) named.add(name);
      kept.push(line);
      return;
    }
    const fault = lineFault(line, options, named);
    if (fault === undefined && goodLoopbackLine(line)) {
      if (goodLoopbackLines.size >= maxGoodLines) goodLoopbackLines.clear();
      goodLoopbackLines.set(key, namesOf(line));
    }
    if (fault === undefined) {
      kept.push(line);
      return;
    }
    const message =
      `rendered hosts file, line ${i + 1}: ${JSON.stringify(clip(line))} dropped (${fault}); expected a comment, a blank line ` +
      `or "ADDRESS NAME [NAME...]" with ADDRESS an IPv4 address inside 127.0.0.0/8 (or, after that, one of the name's gateways) and each NAME a DNS host name (RFC 1123: ` +
      `letters, digits and hyphens, labels of at most 63 characters, at most 253 in all)${under}`;
    dropped.push({ line, problem: { code: codes.hostsInvalidLine, message } });
  });
  return { text: kept.length > 0 ? `${kept.join('\n')}\n` : '', dropped };
}
