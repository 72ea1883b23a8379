/** Small statistics and formatting helpers shared by the benchmark parts. */

export function median(values: readonly number[]): number {
  const finite = values.filter((v) => Number.isFinite(v));
  if (finite.length === 0) return NaN;
  const sorted = [...finite].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** The per-round ratios `a[i] / b[i]`. */
export function pairedRatios(a: readonly number[], b: readonly number[]): number[] {
  const n = Math.min(a.length, b.length);
  const ratios: number[] = [];
  for (let i = 0; i < n; i++) ratios.push(a[i]! / b[i]!);
  return ratios;
}

/** Median of the per-round ratios `a[i] / b[i]`: paired, so that drift between rounds cancels out. */
export function pairedRatio(a: readonly number[], b: readonly number[]): number {
  return median(pairedRatios(a, b));
}

/**
 * A distribution-free confidence interval for the median (default 95 %): the order statistics `k` and `n + 1 − k`
 * with the largest `k` such that a binomial(n, ½) count falls below `k` with probability at most `(1 − level) / 2`.
 * With few values it widens to [min, max] (for 3 values its coverage is only 75 %).
 */
export function medianInterval(values: readonly number[], level = 0.95): { lo: number; hi: number } {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((x, y) => x - y);
  const n = sorted.length;
  if (n === 0) return { lo: NaN, hi: NaN };
  // P(count ≤ j) for count ~ binomial(n, ½), accumulated term by term (n is a few dozen here).
  let term = 0.5 ** n;
  let below = 0;
  let k = 1;
  for (let j = 0; j < n; j++) {
    below += term; // P(count ≤ j): [x_(j+1), x_(n−j)] misses the median at most twice this often
    if (below > (1 - level) / 2) break;
    k = j + 1;
    term = (term * (n - j)) / (j + 1);
  }
  k = Math.min(k, (n + 1) >> 1);
  return { lo: sorted[k - 1]!, hi: sorted[n - k]! };
}

/** Median of the per-round differences `a[i] - b[i]`. */
export function pairedDifference(a: readonly number[], b: readonly number[]): number {
  const n = Math.min(a.length, b.length);
  const diffs: number[] = [];
  for (let i = 0; i < n; i++) diffs.push(a[i]! - b[i]!);
  return median(diffs);
}

/** Microseconds with a precision that suits their size. */
export function fmtUs(us: number): string {
  if (!Number.isFinite(us)) return "n/a";
  if (us < 10) return `${us.toFixed(2)} µs`;
  if (us < 1000) return `${us.toFixed(1)} µs`;
  return `${Math.round(us).toLocaleString("en-US")} µs`;
}

export function fmtRatio(r: number): string {
  return Number.isFinite(r) ? r.toFixed(3) : "n/a";
}

export function fmtMiB(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

/** Signed kibibytes, for heap growth. */
export function fmtKiBSigned(bytes: number): string {
  const kib = bytes / 1024;
  return `${kib >= 0 ? "+" : ""}${kib.toFixed(0)} KiB`;
}

/** A GitHub-flavoured markdown table. */
export function table(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const lines = [`| ${header.join(" | ")} |`, `|${header.map((_, i) => (i === 0 ? "---" : "---:")).join("|")}|`];
  for (const row of rows) lines.push(`| ${row.join(" | ")} |`);
  return lines.join("\n");
}

/** Rotate `items` by `k` places: the order of implementations changes every round. */
export function rotate<T>(items: readonly T[], k: number): T[] {
  if (items.length === 0) return [];
  const s = ((k % items.length) + items.length) % items.length;
  return [...items.slice(s), ...items.slice(0, s)];
}

/** Run `op` `n` times one after the other; microseconds per call. */
export async function timeSerial(op: () => Promise<unknown>, n: number): Promise<number> {
  const started = performance.now();
  for (let i = 0; i < n; i++) await op();
  return ((performance.now() - started) * 1000) / n;
}

/**
 * How many calls of `op` make a batch of about `targetMs`, after warming the path up: calls run for at least
 * `2 × targetMs` (and at least 5 calls, at most `maxCalls`), and the per-call time of the second half of
 * them sizes the batch.
 */
export async function calibrate(op: () => Promise<unknown>, targetMs: number, maxCalls = 200_000): Promise<number> {
  const start = performance.now();
  let calls = 0;
  let half = NaN;
  let halfCalls = 0;
  while (calls < maxCalls && (calls < 5 || performance.now() - start < 2 * targetMs)) {
    await op();
    calls++;
    if (Number.isNaN(half) && performance.now() - start >= targetMs) {
      half = performance.now();
      halfCalls = calls;
    }
  }
  const usPerCall =
    Number.isNaN(half) || calls - halfCalls < 2
      ? ((performance.now() - start) * 1000) / calls
      : ((performance.now() - half) * 1000) / (calls - halfCalls);
  return Math.max(1, Math.min(maxCalls, Math.round((targetMs * 1000) / Math.max(usPerCall, 0.001))));
}

/** One measured cell: its key in the samples, what it runs, and how many calls make a batch. */
export interface RoundCell {
  readonly key: string;
  readonly op: () => Promise<unknown>;
  calls: number;
}

/**
 * Interleaved rounds: run every cell once (warm-up), size each cell's batch to `batchMs`, then
 * in each round time one batch of every cell of every group, in an order that rotates per round.
 * Returns µs per call, one value per round, by key; `progress(round, seconds)` after each round.
 */
export async function runRounds(
  groups: readonly (readonly RoundCell[])[],
  options: { readonly rounds: number; readonly batchMs: number },
  progress: (round: number, seconds: number) => void,
): Promise<Map<string, number[]>> {
  for (const group of groups) for (const cell of group) await cell.op();
  for (const group of groups) for (const cell of group) cell.calls = await calibrate(cell.op, options.batchMs);
  const samples = new Map<string, number[]>();
  const started = performance.now();
  for (let round = 0; round < options.rounds; round++) {
    for (const group of groups) {
      for (const cell of rotate(group, round)) {
        const us = await timeSerial(cell.op, cell.calls);
        let list = samples.get(cell.key);
        if (list === undefined) samples.set(cell.key, (list = []));
        list.push(us);
      }
    }
    progress(round + 1, (performance.now() - started) / 1000);
  }
  return samples;
}
