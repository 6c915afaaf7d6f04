/**
 * A bench's whole-number flag (`--NAME N`, 1 to 100,000), or the fallback; a bad value ends the
 * process with exit 2 and a line naming the flag, the value and what was expected.
 */
export function wholeNumberFlag(bench: string, argv: readonly string[], name: string, fallback: number): number {
  const i = argv.indexOf(`--${name}`);
  if (i < 0) return fallback;
  const n = Number(argv[i + 1]);
  if (!Number.isInteger(n) || n < 1 || n > 100_000) {
    process.stderr.write(`${bench}: --${name} ${String(argv[i + 1])}: expected a whole number from 1 to 100000\n`);
    process.exit(2);
  }
  return n;
}
