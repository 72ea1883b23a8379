/**
 * One implementation's memory after many empty blocks, in a process of its own (run with --expose-gc):
 * `node --expose-gc memory-child.js <impl> <empty|emptyTx> <blocks>`. The heap is measured after a full GC
 * once a tenth of the blocks have run (the baseline, everything warmed up) and again after all of them;
 * the figures go back to the parent over IPC.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { initializeTransactionalContext, StorageDriver } from "typeorm-transactional";
import { makeOps, openBackend, type ImplId, type ScenarioId } from "./backends.js";

export interface MemoryReply {
  readonly impl: string;
  readonly scenario: string;
  readonly blocks: number;
  readonly heapBaseline: number;
  readonly heapAfter: number;
  readonly rssAfter: number;
  readonly seconds: number;
  readonly error?: string;
}

const gc = (globalThis as { gc?: () => void }).gc;

async function fullGc(): Promise<void> {
  if (gc === undefined) throw new Error("run with --expose-gc");
  for (let i = 0; i < 4; i++) {
    gc();
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

async function main(): Promise<MemoryReply> {
  const [impl, scenario, blocksArg] = process.argv.slice(2) as [ImplId, ScenarioId, string];
  const blocks = Number(blocksArg);
  const tt = impl === "ttRun" || impl === "ttDecorator";
  if (tt) initializeTransactionalContext({ storageDriver: StorageDriver.ASYNC_LOCAL_STORAGE });
  const dir = mkdtempSync(join(tmpdir(), "tss-bench-mem-"));
  const backend = await openBackend("sqlite", join(dir, "bench.db"), { tt, seed: true });
  try {
    const op = makeOps(backend)[impl][scenario];
    if (op === undefined) throw new Error(`${impl} has no ${scenario} block`);
    const warm = Math.ceil(blocks / 10);
    const started = performance.now();
    for (let i = 0; i < warm; i++) await op();
    await fullGc();
    const heapBaseline = process.memoryUsage().heapUsed;
    for (let i = warm; i < blocks; i++) await op();
    const seconds = (performance.now() - started) / 1000;
    await fullGc();
    const { heapUsed, rss } = process.memoryUsage();
    return { impl, scenario, blocks, heapBaseline, heapAfter: heapUsed, rssAfter: rss, seconds };
  } finally {
    await backend.dispose();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  (reply) => process.send?.(reply, () => process.exit(0)),
  (error: unknown) => {
    const reply: MemoryReply = {
      impl: process.argv[2] ?? "?",
      scenario: process.argv[3] ?? "?",
      blocks: 0,
      heapBaseline: NaN,
      heapAfter: NaN,
      rssAfter: NaN,
      seconds: NaN,
      error: error instanceof Error ? (error.stack ?? error.message) : String(error),
    };
    process.send?.(reply, () => process.exit(1));
  },
);
