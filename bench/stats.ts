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

/** The `q` quantile (0..1) of the finite values, linearly interpolated between order statistics. */
export function quantile(values: readonly number[], q: number): number {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((x, y) => x - y);
  if (sorted.length === 0) return NaN;
  const at = Math.min(1, Math.max(0, q)) * (sorted.length - 1);
  const below = Math.floor(at);
  const above = Math.min(sorted.length - 1, below + 1);
  return sorted[below]! + (sorted[above]! - sorted[below]!) * (at - below);
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
