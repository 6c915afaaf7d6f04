import { connectLatencyBuckets, type LatencyHistogram } from './status.js';

/**
 * The connect-latency histogram of one service: a count per bucket of connectLatencyBuckets (plus
 * one above the last), their sum and count. One comparison loop per successful connect; the
 * report carries it (and `loopmesh balancer --workers` sums the workers' buckets), and /metrics
 * exposes it as a Prometheus histogram.
 */
export class LatencyRecorder {
  private readonly counts: number[] = new Array<number>(connectLatencyBuckets.length + 1).fill(0);
  private count = 0;
  private sumSeconds = 0;

  observe(seconds: number): void {
    let i = 0;
    while (i < connectLatencyBuckets.length && seconds > (connectLatencyBuckets[i] as number)) i++;
    this.counts[i] = (this.counts[i] as number) + 1;
    this.count++;
    this.sumSeconds += seconds;
  }

  snapshot(): LatencyHistogram {
    return { counts: [...this.counts], count: this.count, sumSeconds: this.sumSeconds };
  }
}

/** An empty histogram (a route not served by a balancer in this process). */
export function emptyLatency(): LatencyHistogram {
  return { counts: new Array<number>(connectLatencyBuckets.length + 1).fill(0), count: 0, sumSeconds: 0 };
}

/** `into` plus `other`, bucket by bucket (the workers' histograms into one). */
export function addLatency(into: LatencyHistogram, other: LatencyHistogram): LatencyHistogram {
  return {
    counts: into.counts.map((n, i) => n + (other.counts[i] ?? 0)),
    count: into.count + other.count,
    sumSeconds: into.sumSeconds + other.sumSeconds,
  };
}
