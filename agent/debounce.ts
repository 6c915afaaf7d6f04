/**
 * Coalesces bursts: `fn` runs `minMs` after the last call, but never later than `maxMs` after the
 * first call of a burst. One mechanism for catalog changes, file events and reload requests.
 */
export interface Debounced {
  (): void;
  /** Runs a pending call now. */
  flush(): void;
  cancel(): void;
}

export function debounce(fn: () => void, minMs: number, maxMs: number): Debounced {
  let timer: NodeJS.Timeout | undefined;
  let burstStart = 0;

  const run = (): void => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    burstStart = 0;
    fn();
  };

  const debounced = (() => {
    const now = Date.now();
    if (burstStart === 0) burstStart = now;
    if (timer) clearTimeout(timer);
    const wait = Math.max(0, Math.min(minMs, burstStart + maxMs - now));
    timer = setTimeout(run, wait);
  }) as Debounced;
  debounced.flush = () => {
    if (timer) run();
  };
  debounced.cancel = () => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    burstStart = 0;
  };
  return debounced;
}
