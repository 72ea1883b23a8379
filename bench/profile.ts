/**
 * Profile ours' hot path on one scenario (default: the empty block, no statement: pure overhead), on SQLite or
 * on a throwaway PostgreSQL (started and stopped here).
 *
 *   node --cpu-prof --cpu-prof-dir=/tmp/tss-prof build/bench/profile.js [blocks] [oursBlock|oursDecorator|floor] [empty|read|tx2|nested|emptyTx] [sqlite|postgres]
 *   node build/bench/profile.js --summarize /tmp/tss-prof/<file>.cpuprofile [top] [only]
 *
 * The second form prints the functions with the most self time and their share of the profile; with `only`
 * (e.g. `build/src/`, the library as the benchmarks load it), only the functions whose location contains it,
 * with their share of the whole profile and of those functions together.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startPostgres } from "../spec/support/postgres.js";
import { type BackendKind, makeOps, openBackend, type ImplId, type ScenarioId } from "./backends.js";

interface ProfileNode {
  readonly id: number;
  readonly callFrame: { readonly functionName: string; readonly url: string; readonly lineNumber: number };
}
interface CpuProfile {
  readonly nodes: readonly ProfileNode[];
  readonly samples: readonly number[];
  readonly timeDeltas: readonly number[];
}

function summarize(file: string, top: number, only: string | undefined): void {
  const profile = JSON.parse(readFileSync(file, "utf8")) as CpuProfile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  let total = 0;
  profile.samples.forEach((id, i) => {
    const node = byId.get(id);
    const dt = profile.timeDeltas[i] ?? 0;
    if (node === undefined) return;
    const { functionName, url, lineNumber } = node.callFrame;
    const where =
      url === ""
        ? ""
        : ` ${url.replace(/^file:\/\//, "").replace(/^.*\/(node_modules|build)\//, "$1/")}:${lineNumber + 1}`;
    const name = `${functionName || "(anonymous)"}${where}`;
    self.set(name, (self.get(name) ?? 0) + dt);
    total += dt;
  });
  const kept = [...self.entries()].filter(([name]) => only === undefined || name.includes(` ${only}`));
  const keptTotal = kept.reduce((sum, [, us]) => sum + us, 0);
  const rows = kept.sort((a, b) => b[1] - a[1]).slice(0, top);
  console.log(`total sampled: ${(total / 1000).toFixed(0)} ms`);
  if (only === undefined) {
    for (const [name, us] of rows) console.log(`${((100 * us) / total).toFixed(1).padStart(5)}%  ${name}`);
    return;
  }
  console.log(`in ${only}: ${(keptTotal / 1000).toFixed(0)} ms (${((100 * keptTotal) / total).toFixed(1)}%); of all, of those:`); // prettier-ignore
  for (const [name, us] of rows) {
    console.log(`${((100 * us) / total).toFixed(1).padStart(5)}%  ${((100 * us) / keptTotal).toFixed(1).padStart(5)}%  ${name}`); // prettier-ignore
  }
}

async function profile(blocks: number, impl: ImplId, scenario: ScenarioId, kind: BackendKind): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "tss-bench-prof-"));
  const pg = kind === "postgres" ? await startPostgres() : undefined;
  if (kind === "postgres" && pg === undefined) throw new Error("no PostgreSQL server binaries here");
  const backend = await openBackend(kind, pg?.url ?? join(dir, "bench.db"), { tt: false, seed: true });
  try {
    const op = makeOps(backend)[impl][scenario];
    if (op === undefined) throw new Error(`${impl} has no ${scenario} block`);
    const started = performance.now();
    for (let i = 0; i < blocks; i++) await op();
    const us = ((performance.now() - started) * 1000) / blocks;
    console.log(`${impl}: ${blocks} ${scenario} blocks, ${us.toFixed(2)} µs each`);
  } finally {
    await backend.dispose();
    await pg?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

const args = process.argv.slice(2);
const run =
  args[0] === "--summarize"
    ? Promise.resolve(summarize(args[1] ?? "", Number(args[2] ?? 25), args[3]))
    : profile(
        Number(args[0] ?? 300_000),
        (args[1] ?? "oursBlock") as ImplId,
        (args[2] ?? "empty") as ScenarioId,
        args[3] === "postgres" ? "postgres" : "sqlite",
      );
run.catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
