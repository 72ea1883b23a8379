/**
 * `npm run bench` (add `-- --quick` for the short run CI does): prints the report as markdown on stdout,
 * progress on stderr. Options: --quick, --rounds N, --no-pg, --no-http, --no-memory, --no-als, --no-node24.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { initializeTransactionalContext, StorageDriver } from "typeorm-transactional";
import { startPostgres, type PgServer } from "../spec/support/postgres.js";
import { IMPLS, openBackend, SCENARIOS, type Backend, type ImplId, type ScenarioId } from "./backends.js";
import { node24, runAlsCost, runMemory, type AlsCost, type MemoryJob } from "./children.js";
import { HTTP_IMPLS, runHttp, type HttpResults } from "./http.js";
import { key, runInProcess, type Samples } from "./inprocess.js";
import type { MemoryReply } from "./memory-child.js";
import { fmtKiBSigned, fmtMiB, fmtRatio, fmtUs, median, pairedDifference, pairedRatio, table } from "./stats.js";

const argv = process.argv.slice(2);
const flag = (name: string) => argv.includes(name);
const QUICK = flag("--quick");
const roundsArg = argv.indexOf("--rounds");
const CONFIG = {
  rounds: roundsArg >= 0 ? Math.max(1, Number(argv[roundsArg + 1]) || 1) : QUICK ? 3 : 20,
  batchMs: QUICK ? 5 : 50,
  http: QUICK
    ? { rounds: 1, durationS: 1, warmupS: 0, connections: 10 }
    : { rounds: 3, durationS: 3, warmupS: 1, connections: 10 },
  memoryBlocks: QUICK ? 5_000 : 100_000,
  als: QUICK ? { pairs: 1, batchMs: 5, batches: 3 } : { pairs: 3, batchMs: 50, batches: 7 },
};
/** Heap growth between the baseline and the end that still counts as flat. */
const FLAT_BYTES = 1024 * 1024;

const out = (text = "") => console.log(text);
const log = (line: string) => console.error(line);

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
function version(name: string): string {
  try {
    return (JSON.parse(readFileSync(join(ROOT, "node_modules", name, "package.json"), "utf8")) as { version: string })
      .version;
  } catch {
    return "?";
  }
}

interface Target {
  readonly goal: string;
  readonly figure: string;
  readonly met: boolean | undefined;
}
const verdict = (met: boolean | undefined) => (met === undefined ? "not measured" : met ? "met" : "**missed**");

const started = performance.now();
const elapsed = () => `${((performance.now() - started) / 1000).toFixed(1)} s`;

async function main(): Promise<void> {
  initializeTransactionalContext({ storageDriver: StorageDriver.ASYNC_LOCAL_STORAGE });
  const dir = mkdtempSync(join(os.tmpdir(), "tss-bench-"));
  const sqliteFile = join(dir, "bench.db");
  const backends: Backend[] = [];
  let pg: PgServer | undefined;
  const targets: Target[] = [];
  try {
    log("opening SQLite");
    backends.push(await openBackend("sqlite", sqliteFile, { tt: true, seed: true }));
    let pgSkip: string | undefined;
    if (flag("--no-pg")) pgSkip = "--no-pg";
    else {
      log("starting PostgreSQL");
      pg = await startPostgres();
      if (pg === undefined) pgSkip = "no PostgreSQL server binaries here";
      else backends.push(await openBackend("postgres", pg.url, { tt: true, seed: true }));
    }

    const sqliteVersion = (await backends[0]!.plain.query<{ v: string }[]>("SELECT sqlite_version() AS v"))[0]?.v;
    const pgVersion =
      pg === undefined
        ? undefined
        : (await backends[1]!.plain.query<{ server_version: string }[]>("SHOW server_version"))[0]?.server_version;
    const cpus = os.cpus();
    out(`# typeorm-scoped-session benchmarks${QUICK ? " (--quick: small rounds, figures are indicative only)" : ""}`);
    out();
    out(`- date: ${new Date().toISOString()}`);
    out(
      `- machine: ${cpus[0]?.model.trim() ?? "?"}, ${cpus.length} cores, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB, ` +
        `${os.type()} ${os.release()}`,
    );
    out(
      `- node ${process.version}, typeorm ${version("typeorm")}, sqlite3 ${version("sqlite3")} (SQLite ${sqliteVersion ?? "?"}), ` +
        `pg ${version("pg")} (PostgreSQL ${pgVersion ?? "skipped"}), typeorm-transactional ${version("typeorm-transactional")}, ` +
        `express ${version("express")}, autocannon ${version("autocannon")}`,
    );
    out(
      `- ${CONFIG.rounds} interleaved rounds of ~${CONFIG.batchMs} ms batches per cell; figures are medians, ratios ` +
        `are medians of per-round ratios to the floor's batch of the same round`,
    );
    if (pgSkip !== undefined) out(`- PostgreSQL skipped: ${pgSkip}`);
    out();

    // --- in-process scenarios -------------------------------------------------------------------------
    log(`in-process scenarios: ${CONFIG.rounds} rounds`);
    const samples = await runInProcess(backends, { rounds: CONFIG.rounds, batchMs: CONFIG.batchMs }, log);
    out("## Blocks, in one process (both AsyncLocalStorages enabled for every row, the floor's too)");
    out();
    out(
      "Median µs per block (the 64-reads column: per batch of 64 concurrent blocks), ratio to the floor in " +
        "parentheses; lower is better. typeorm-transactional has no non-transactional block: its empty, read and " +
        "concurrent rows use `Propagation.SUPPORTS`. `dataSource.transaction` has only transactional forms. " +
        "Nested: a transactional block whose inner block (`withSession`, `REQUIRED`, or a function given the " +
        "manager) joins it and reads one row.",
    );
    for (const b of backends) {
      out();
      out(`### ${b.label}${b.kind === "sqlite" ? " (file in a temp dir)" : " (throwaway local server, pool of 5)"}`);
      out();
      const rows = IMPLS.map((impl) => [
        impl.label,
        ...SCENARIOS.map((s) => {
          const mine = samples.get(key(b.label, s.id, impl.id));
          const floor = samples.get(key(b.label, s.id, "floor"));
          if (mine === undefined || floor === undefined) return "n/a";
          return `${fmtUs(median(mine))} (${fmtRatio(pairedRatio(mine, floor))})`;
        }),
      ]);
      out(table(["implementation", ...SCENARIOS.map((s) => s.label)], rows));
    }
    out();
    addBlockTargets(targets, backends, samples);

    // --- HTTP -----------------------------------------------------------------------------------------
    if (flag("--no-http")) out("HTTP skipped: --no-http\n");
    else {
      log(`HTTP (${elapsed()}): ${CONFIG.http.rounds} rounds of ${CONFIG.http.durationS} s per implementation`);
      const http = await runHttp(backends, CONFIG.http, log);
      printHttp(backends, http);
      addHttpTargets(targets, backends, http);
    }
  } finally {
    for (const b of backends) await b.dispose().catch((error: unknown) => log(`dispose: ${String(error)}`));
    await pg?.stop();
  }

  try {
    // --- memory -------------------------------------------------------------------------------------
    if (flag("--no-memory")) out("Memory skipped: --no-memory\n");
    else {
      const jobs: MemoryJob[] = [];
      for (const impl of IMPLS) {
        for (const scenario of ["empty", "emptyTx"] as const) {
          if (!(impl.id === "dsTransaction" && scenario === "empty")) jobs.push({ impl: impl.id, scenario });
        }
      }
      // --quick only checks that the machinery runs: the floor and ours.
      if (QUICK) jobs.splice(0, jobs.length, ...jobs.filter((j) => j.impl === "floor" || j.impl === "oursBlock"));
      log(`memory (${elapsed()}): ${jobs.length} child processes of ${CONFIG.memoryBlocks} blocks`);
      const memory = await runMemory(jobs, CONFIG.memoryBlocks, 2);
      printMemory(memory);
      addMemoryTargets(targets, memory);
    }

    // --- ALS cost -----------------------------------------------------------------------------------
    if (flag("--no-als")) out("ALS cost skipped: --no-als\n");
    else {
      const costs: AlsCost[] = [];
      log(`ALS cost (${elapsed()}): current node`);
      costs.push(await runAlsCost(process.execPath, sqliteFile, CONFIG.als));
      let skip24: string | undefined;
      if (flag("--no-node24")) skip24 = "--no-node24";
      else if (QUICK) skip24 = "--quick";
      else if (process.version.startsWith("v24.")) skip24 = "this is Node 24";
      else {
        const n24 = await node24(true);
        if (n24.path === undefined) skip24 = n24.reason;
        else {
          log("ALS cost: node 24");
          costs.push(await runAlsCost(n24.path, sqliteFile, CONFIG.als));
        }
      }
      printAls(costs, skip24);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  // --- targets ----------------------------------------------------------------------------------------
  out("## Targets (goals, not assertions)");
  out();
  out(
    table(
      ["target", "figure", "verdict"],
      targets.map((t) => [t.goal, t.figure, verdict(t.met)]),
    ),
  );
  out();
  out(`Total time: ${elapsed()}.`);
}

// ---------------------------------------------------------------------------------------------------------

/** The worse (larger) of ours' block and decorator figures, both shown. */
function worstOfOurs(
  b: Backend,
  scenario: ScenarioId,
  samples: Samples,
  measure: (mine: number[], other: number[]) => number,
  against: (impl: ImplId) => ImplId,
  fmt: (v: number) => string,
): { value: number; figure: string } {
  const parts: string[] = [];
  let worst = -Infinity;
  for (const impl of ["oursBlock", "oursDecorator"] as const) {
    const mine = samples.get(key(b.label, scenario, impl));
    const other = samples.get(key(b.label, scenario, against(impl)));
    if (mine === undefined || other === undefined) continue;
    const v = measure(mine, other);
    worst = Math.max(worst, v);
    parts.push(`${impl === "oursBlock" ? "withSession" : "@UsesSession"} ${fmt(v)}`);
  }
  return { value: worst, figure: parts.join(", ") };
}

function addBlockTargets(targets: Target[], backends: readonly Backend[], samples: Samples): void {
  const floor = () => "floor" as const;
  for (const b of backends) {
    const limit = b.kind === "sqlite" ? 1.03 : 1.01;
    const r = worstOfOurs(b, "read", samples, pairedRatio, floor, fmtRatio);
    targets.push({
      goal: `${b.label}: one-read block, ours/floor ≤ ${limit}`,
      figure: r.figure,
      met: r.value <= limit,
    });
  }
  for (const b of backends) {
    const d = worstOfOurs(b, "empty", samples, pairedDifference, floor, (v) => `${v.toFixed(2)} µs`);
    targets.push({
      goal: `${b.label}: empty-block overhead over the floor ≤ 2 µs`,
      figure: d.figure,
      met: d.value <= 2,
    });
  }
  for (const b of backends) {
    if (b.tt === undefined) continue;
    const misses: string[] = [];
    let worst = 0;
    for (const s of SCENARIOS) {
      for (const [mine, theirs] of [
        ["oursBlock", "ttRun"],
        ["oursDecorator", "ttDecorator"],
      ] as const) {
        const a = samples.get(key(b.label, s.id, mine));
        const t = samples.get(key(b.label, s.id, theirs));
        if (a === undefined || t === undefined) continue;
        const ratio = pairedRatio(a, t);
        worst = Math.max(worst, ratio);
        if (ratio > 1) misses.push(`${s.label} ${mine === "oursBlock" ? "block" : "decorator"} ${fmtRatio(ratio)}`);
      }
    }
    targets.push({
      goal: `${b.label}: ours at least as fast as typeorm-transactional in every scenario (ours/theirs ≤ 1)`,
      figure: misses.length === 0 ? `worst ours/theirs ${fmtRatio(worst)}` : `slower in: ${misses.join("; ")}`,
      met: misses.length === 0,
    });
  }
}

function printHttp(backends: readonly Backend[], http: HttpResults): void {
  out("## HTTP: Express 5, one primary-key read per request");
  out();
  out(
    `autocannon, ${CONFIG.http.connections} connections, ${CONFIG.http.durationS} s per implementation per round, ` +
      `${CONFIG.http.rounds} interleaved round(s); medians; ratios to the floor (req/s: higher is better, p99: lower).`,
  );
  for (const b of backends) {
    const floor = http.get(`${b.label}/floor`);
    out();
    out(`### ${b.label}`);
    out();
    const rows: string[][] = [];
    for (const impl of HTTP_IMPLS) {
      const r = http.get(`${b.label}/${impl.id}`);
      if (r === undefined || floor === undefined) continue;
      rows.push([
        impl.label,
        Math.round(median(r.rps)).toLocaleString("en-US"),
        fmtRatio(pairedRatio(r.rps, floor.rps)),
        `${median(r.p99).toFixed(1)} ms`,
        fmtRatio(pairedRatio(r.p99, floor.p99)),
        `${r.errors}/${r.total}`,
      ]);
    }
    out(table(["implementation", "req/s", "× floor", "p99", "p99 × floor", "errors"], rows));
  }
  out();
}

function addHttpTargets(targets: Target[], backends: readonly Backend[], http: HttpResults): void {
  for (const b of backends) {
    const floor = http.get(`${b.label}/floor`);
    const parts: string[] = [];
    let worst = Infinity;
    for (const impl of ["oursMiddleware", "oursBlock"] as const) {
      const r = http.get(`${b.label}/${impl}`);
      if (r === undefined || floor === undefined) continue;
      const ratio = pairedRatio(r.rps, floor.rps);
      worst = Math.min(worst, ratio);
      parts.push(`${impl === "oursMiddleware" ? "middleware" : "withSession"} ${fmtRatio(ratio)}`);
    }
    targets.push({ goal: `${b.label}: HTTP req/s ≥ 0.97 × floor`, figure: parts.join(", "), met: worst >= 0.97 });
    const tt = http.get(`${b.label}/ttRun`);
    const ours = http.get(`${b.label}/oursMiddleware`);
    if (tt !== undefined && ours !== undefined) {
      const ratio = pairedRatio(ours.rps, tt.rps);
      targets.push({
        goal: `${b.label}: HTTP req/s, ours (middleware) ≥ typeorm-transactional`,
        figure: `ours/theirs ${fmtRatio(ratio)}`,
        met: ratio >= 1,
      });
    }
  }
}

const memoryLabel = (m: MemoryReply) =>
  `${IMPLS.find((i) => i.id === m.impl)?.label ?? m.impl}: ${m.scenario === "empty" ? "empty block" : "empty transaction"}`;

function printMemory(memory: readonly MemoryReply[]): void {
  const blocks = CONFIG.memoryBlocks;
  out(`## Memory: ${blocks.toLocaleString("en-US")} empty blocks on SQLite, one child process each`);
  out();
  out(
    `heapUsed after a full GC (\`--expose-gc\`) once ${(blocks / 10).toLocaleString("en-US")} blocks have run (baseline) ` +
      `and after all ${blocks.toLocaleString("en-US")}; RSS at the end. Flat: growth ≤ ${fmtMiB(FLAT_BYTES)}.`,
  );
  out();
  const rows = memory.map((m) =>
    m.error !== undefined
      ? [memoryLabel(m), "failed", "", "", "", "", m.error.split("\n")[0] ?? ""]
      : [
          memoryLabel(m),
          fmtMiB(m.heapBaseline),
          fmtMiB(m.heapAfter),
          fmtKiBSigned(m.heapAfter - m.heapBaseline),
          `${((m.heapAfter - m.heapBaseline) / (m.blocks * 0.9)).toFixed(1)} B`,
          fmtMiB(m.rssAfter),
          m.heapAfter - m.heapBaseline <= FLAT_BYTES ? "yes" : "**no**",
        ],
  );
  out(table(["implementation", "heap (baseline)", "heap (end)", "growth", "per block", "RSS (end)", "flat"], rows));
  out();
}

function addMemoryTargets(targets: Target[], memory: readonly MemoryReply[]): void {
  const ours = memory.filter((m) => m.impl === "oursBlock" || m.impl === "oursDecorator");
  const growth = ours.map((m) => m.heapAfter - m.heapBaseline);
  targets.push({
    goal: `heap flat after ${CONFIG.memoryBlocks.toLocaleString("en-US")} blocks (ours, growth ≤ ${fmtMiB(FLAT_BYTES)})`,
    figure: ours
      .map((m, i) => `${m.impl === "oursBlock" ? "block" : "decorator"} ${m.scenario} ${fmtKiBSigned(growth[i]!)}`)
      .join(", "),
    met: ours.length > 0 && growth.every((g) => g <= FLAT_BYTES),
  });
}

function printAls(costs: readonly AlsCost[], skip24: string | undefined): void {
  out("## The process-wide cost of an enabled AsyncLocalStorage (the floor alone, SQLite)");
  out();
  out(
    `Child processes running only the floor, without and with one AsyncLocalStorage enabled around everything ` +
      `(${CONFIG.als.pairs} alternating pair(s), medians). "speed" = time without / time with: 1.00 means no cost. ` +
      "The in-process table above compares every implementation under the same (enabled) condition.",
  );
  out();
  const rows: string[][] = [];
  for (const c of costs) {
    for (const [name, label] of [
      ["empty", "empty block"],
      ["read", "one PK read"],
      ["conc64", "64 concurrent reads (batch)"],
    ] as const) {
      const off = median(c.off.map((r) => r[name]));
      const on = median(c.on.map((r) => r[name]));
      rows.push([c.node, label, fmtUs(off), fmtUs(on), `${(off / on).toFixed(2)}×`]);
    }
  }
  out(table(["node", "scenario", "without ALS", "with ALS", "speed with ALS"], rows));
  if (skip24 !== undefined) out(`\nNode 24 skipped: ${skip24}`);
  out();
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
