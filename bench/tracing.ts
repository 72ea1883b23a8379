/**
 * The cost of the `tracing` registry option (issue 12): an empty `withSession` and a `withTransaction` with two
 * inserts, each against the hand-written floor, with tracing off and with `tracing: true`.
 *
 * Two children per Node version, forked by `run.ts` like the block table's: one with no OpenTelemetry SDK
 * registered (`tracing: true` then makes no span: the "no SDK" row), one that registers a `NodeTracerProvider`
 * with a `SimpleSpanProcessor(InMemorySpanExporter)` before anything is measured (the "in-memory SDK" row). A
 * registered provider installs a context manager for the whole process, so it is only ever registered in the
 * second child: the first child's floor and "off" rows run as in an application without OpenTelemetry. Both
 * children measure the same three cells (floor, off, `tracing: true`) in interleaved rounds, so that every
 * comparison the report makes is paired by round within one process.
 */
import "reflect-metadata";
import { DataSource, type DataSourceOptions, type EntityManager } from "typeorm";
import { createSessionRegistry, type SessionRegistry } from "../src/index.js";
import { BenchNote } from "./entities.js";
import { fmtRatio, fmtUs, median, pairedRatio, pairedRatios, medianInterval, type RoundCell, runRounds, table } from "./stats.js"; // prettier-ignore

/** `plain`: no SDK in the process; `sdk`: the in-memory SDK registered before anything runs. */
export type TracingChild = "plain" | "sdk";

export type TracingScenario = "empty" | "tx2";
export type TracingImpl = "floor" | "off" | "traced";

export const TRACING_SCENARIOS: readonly { id: TracingScenario; label: string }[] = [
  { id: "empty", label: "empty withSession" },
  { id: "tx2", label: "withTransaction: 2 inserts" },
];

/** What a tracing child measured: µs per call, one value per round, under `backend/scenario/impl`. */
export interface TracingReply {
  readonly child: TracingChild;
  readonly samples: [string, number[]][];
  /** In the `sdk` child: spans exported by one block of each scenario (checks the SDK row traces). */
  readonly spansPerBlock?: Partial<Record<TracingScenario, number>>;
}

export const tracingKey = (backend: string, scenario: TracingScenario, impl: TracingImpl): string =>
  `${backend}/${scenario}/${impl}`;

/** Where the tracing cells run: SQLite in memory (one database per DataSource), or the bench's PostgreSQL. */
interface TracingBackend {
  readonly label: string;
  options(): DataSourceOptions;
}

/** The InMemorySpanExporter's part that is used here. */
interface Exporter {
  getFinishedSpans(): readonly unknown[];
  reset(): void;
}

/** Spans are dropped every this many blocks, so that the exporter's list stays short and the heap flat. */
const RESET_EVERY = 256;

/** Registers the in-memory SDK for the whole process (only ever called in the `sdk` child). */
async function registerInMemorySdk(): Promise<Exporter> {
  // Loaded here only, so that the `plain` child does not even load the SDK's modules.
  const { InMemorySpanExporter, NodeTracerProvider, SimpleSpanProcessor } = await import("@opentelemetry/sdk-trace-node"); // prettier-ignore
  const exporter = new InMemorySpanExporter();
  new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }).register();
  return exporter;
}

async function open(options: DataSourceOptions): Promise<DataSource> {
  const ds = new DataSource(options);
  await ds.initialize();
  return ds;
}

/**
 * Measures floor, off and `tracing: true` for every scenario on SQLite in memory and (with `pgUrl`) PostgreSQL,
 * in this process; `child: "sdk"` registers the in-memory SDK first.
 */
export async function runTracing(
  child: TracingChild,
  pgUrl: string | undefined,
  options: { rounds: number; batchMs: number },
  log: (line: string) => void,
): Promise<TracingReply> {
  const exporter = child === "sdk" ? await registerInMemorySdk() : undefined;
  const backends: TracingBackend[] = [
    {
      label: "SQLite",
      // In memory: each DataSource has a database of its own, made by `synchronize`; no disk in the figures.
      options: () => ({ type: "sqlite", database: ":memory:", entities: [BenchNote], synchronize: true }),
    },
  ];
  if (pgUrl !== undefined) {
    backends.push({
      label: "PostgreSQL",
      // The parent created and seeded the table; a pool of 5 as in the block table.
      options: () => ({ type: "postgres", url: pgUrl, entities: [BenchNote], extra: { max: 5 } }),
    });
  }
  const sources: DataSource[] = [];
  const registries: SessionRegistry[] = [];
  const groups: RoundCell[][] = [];
  const spansPerBlock: Partial<Record<TracingScenario, number>> = {};
  try {
    for (const b of backends) {
      const floorDs = await open(b.options());
      const offDs = await open(b.options());
      const tracedDs = await open(b.options());
      sources.push(floorDs, offDs, tracedDs);
      const off = createSessionRegistry({ name: `tracing-off-${b.label}`, dataSource: offDs });
      const traced = createSessionRegistry({ name: `tracing-on-${b.label}`, dataSource: tracedDs, tracing: true });
      registries.push(off, traced);

      let inserted = 0;
      const insertTwo = async (m: EntityManager) => {
        await m.insert(BenchNote, { body: "bench", n: ++inserted });
        await m.insert(BenchNote, { body: "bench", n: ++inserted });
      };
      const empty = async (): Promise<undefined> => undefined;
      const floorBlock = async () => {
        const qr = floorDs.createQueryRunner();
        try {
          return await empty();
        } finally {
          await qr.release();
        }
      };
      const floorTx = async () => {
        const qr = floorDs.createQueryRunner();
        try {
          await qr.startTransaction();
          try {
            await insertTwo(qr.manager);
            await qr.commitTransaction();
          } catch (error) {
            await qr.rollbackTransaction();
            throw error;
          }
        } finally {
          await qr.release();
        }
      };
      const ops: Record<TracingScenario, Record<TracingImpl, () => Promise<unknown>>> = {
        empty: {
          floor: floorBlock,
          off: () => off.withSession(empty),
          traced: () => traced.withSession(empty),
        },
        tx2: {
          floor: floorTx,
          off: () => off.withTransaction((s) => insertTwo(s.manager)),
          traced: () => traced.withTransaction((s) => insertTwo(s.manager)),
        },
      };
      for (const s of TRACING_SCENARIOS) {
        if (exporter !== undefined && spansPerBlock[s.id] === undefined) {
          exporter.reset();
          await ops[s.id].traced();
          spansPerBlock[s.id] = exporter.getFinishedSpans().length;
          exporter.reset();
        }
        let blocks = 0;
        const traced = ops[s.id].traced;
        // The exporter keeps every span it is given: emptied regularly (one array assignment), memory stays flat.
        const tracedOp = exporter === undefined ? traced : () => (++blocks % RESET_EVERY === 0 && exporter.reset(), traced()); // prettier-ignore
        groups.push([
          { key: tracingKey(b.label, s.id, "floor"), op: ops[s.id].floor, calls: 1 },
          { key: tracingKey(b.label, s.id, "off"), op: ops[s.id].off, calls: 1 },
          { key: tracingKey(b.label, s.id, "traced"), op: tracedOp, calls: 1 },
        ]);
      }
    }

    const samples = await runRounds(groups, options, (round, seconds) => {
      if (round % 5 === 0 || round === options.rounds) {
        log(`  tracing (${child}) round ${round}/${options.rounds} (${seconds.toFixed(1)} s)`);
      }
    });
    exporter?.reset();
    return { child, samples: [...samples], ...(exporter === undefined ? {} : { spansPerBlock }) };
  } finally {
    for (const r of registries) await r.drain({ timeoutMs: 5_000 }).catch(() => undefined);
    for (const ds of sources) if (ds.isInitialized) await ds.destroy();
  }
}

// --- the report ---------------------------------------------------------------------------------------------

/** What the tracing children of one Node version measured. */
export interface TracingRun {
  readonly version: string;
  readonly plain?: TracingReply;
  readonly sdk?: TracingReply;
  /** Why a child has no figures. */
  readonly errors: readonly string[];
}

/** A relative time as a signed percentage: `+0.4 %`. */
function fmtPct(ratio: number): string {
  if (!Number.isFinite(ratio)) return "n/a";
  const pct = (ratio - 1) * 100;
  return `${pct >= 0 ? "+" : "−"}${Math.abs(pct).toFixed(1)} %`;
}

/**
 * `time of a / time of b − 1` as the median of the per-round ratios, with the 95 % confidence interval of that
 * median as the noise band, and whether the band holds 0 (no difference told apart from the noise).
 *
 * @example
 * ```ts
 * relativeCost([10.1, 10.3, 9.9], [10, 10, 10]).text; // "+1.0 % [−1.0 %, +3.0 %]"
 * ```
 */
export function relativeCost(a: readonly number[], b: readonly number[]): { text: string; withinNoise: boolean } {
  const ratios = pairedRatios(a, b);
  const { lo, hi } = medianInterval(ratios);
  const text = `${fmtPct(median(ratios))} [${fmtPct(lo)}, ${fmtPct(hi)}]`;
  return { text, withinNoise: lo <= 1 && 1 <= hi };
}

/** The tracing section as markdown lines. */
export function tracingReport(runs: readonly TracingRun[], backends: readonly string[], rounds: number): string[] {
  const lines: string[] = [];
  lines.push("## The cost of the `tracing` registry option (issue 12)");
  lines.push("");
  lines.push(
    "Two child processes per Node version: one with no OpenTelemetry SDK registered (rows off and " +
      "`tracing: true`, no SDK), one with `NodeTracerProvider` + `SimpleSpanProcessor(InMemorySpanExporter)` " +
      "registered before anything runs (rows off, SDK registered, and `tracing: true`, in-memory SDK; the " +
      `exporter is emptied every ${RESET_EVERY} blocks). Each measures the floor, a registry without ` +
      `\`tracing\` and one with \`tracing: true\` in ${rounds} interleaved rounds. SQLite: in memory, a database per ` +
      "DataSource. × floor: median of the per-round floor time / time, against the floor of the same process " +
      "(higher is better). vs off: median of the per-round time / off's time − 1, in the same process, with the " +
      "95 % confidence interval of that median (distribution-free, from the order statistics of the per-round " +
      "ratios; [min, max] of 3 rounds under --quick) as the noise band; within noise: the band holds 0.",
  );
  const spans = runs.find((r) => r.sdk?.spansPerBlock !== undefined)?.sdk?.spansPerBlock;
  if (spans !== undefined) {
    lines.push("");
    lines.push(
      `Spans exported per block with the SDK: ${TRACING_SCENARIOS.map((s) => `${s.label} ${spans[s.id] ?? "?"}`).join(", ")}.`, // prettier-ignore
    );
  }
  for (const r of runs) for (const e of r.errors) lines.push("", `- node ${r.version}: ${e}`);
  const rowsOf: readonly {
    label: string;
    child: TracingChild;
    impl: TracingImpl;
    vsOff: boolean;
  }[] = [
    { label: "floor: QueryRunner try/finally", child: "plain", impl: "floor", vsOff: false },
    { label: "off (no `tracing`)", child: "plain", impl: "off", vsOff: false },
    { label: "`tracing: true`, no SDK registered", child: "plain", impl: "traced", vsOff: true },
    { label: "off, SDK registered in the process", child: "sdk", impl: "off", vsOff: false },
    { label: "`tracing: true`, in-memory SDK", child: "sdk", impl: "traced", vsOff: true },
  ];
  for (const backend of backends) {
    lines.push("", `### ${backend}${backend === "SQLite" ? " (in memory)" : ""}`, "");
    const rows: string[][] = [];
    for (const s of TRACING_SCENARIOS) {
      let first = true;
      for (const row of rowsOf) {
        const cells = runs.flatMap((r) => {
          const reply = row.child === "plain" ? r.plain : r.sdk;
          const get = (impl: TracingImpl) => reply?.samples.find(([k]) => k === tracingKey(backend, s.id, impl))?.[1];
          const mine = get(row.impl);
          const floor = get("floor");
          const off = get("off");
          if (mine === undefined || floor === undefined) return ["n/a", "n/a", ""];
          let vsOff = "";
          if (row.vsOff && off !== undefined) {
            const c = relativeCost(mine, off);
            vsOff = `${c.text}${c.withinNoise ? " (within noise)" : ""}`;
          }
          return [fmtUs(median(mine)), fmtRatio(pairedRatio(floor, mine)), vsOff];
        });
        rows.push([first ? s.label : "", row.label, ...cells]);
        first = false;
      }
    }
    const header = runs.flatMap((r) => [`${r.version} µs`, "× floor", "vs off"]);
    lines.push(table(["scenario", "variant", ...header], rows));
  }
  lines.push("");
  return lines;
}
