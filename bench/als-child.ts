/**
 * The process-wide cost of an enabled AsyncLocalStorage: the floor alone (no library loaded), in a process
 * of its own, with or without an AsyncLocalStorage enabled around all of it. Runs on any Node version:
 * `node als-child.js <on|off> <batchMs> <batches> <sqlite file>`; prints one JSON line.
 */
import "reflect-metadata";
import { AsyncLocalStorage } from "node:async_hooks";
import { DataSource, type EntityManager } from "typeorm";
import { BenchNote, SEED_ROWS } from "./entities.js";
import { calibrate, median, timeSerial } from "./stats.js";

export interface AlsReply {
  readonly node: string;
  readonly als: boolean;
  /** µs per empty floor block. */
  readonly empty: number;
  /** µs per one-read floor block. */
  readonly read: number;
  /** µs per batch of 64 concurrent floor reads. */
  readonly conc64: number;
}

async function main(): Promise<AlsReply> {
  const [mode, batchMsArg, batchesArg, file] = process.argv.slice(2);
  if (file === undefined) throw new Error("usage: als-child.js <on|off> <batchMs> <batches> <sqlite file>");
  const batchMs = Number(batchMsArg);
  const batches = Number(batchesArg);
  const ds = new DataSource({ type: "sqlite", database: file, entities: [BenchNote] });
  await ds.initialize();
  let cursor = 0;
  const block = async <T>(body: (m: EntityManager) => Promise<T>): Promise<T> => {
    const qr = ds.createQueryRunner();
    try {
      return await body(qr.manager);
    } finally {
      await qr.release();
    }
  };
  const read = () => block((m) => m.findOneBy(BenchNote, { id: (cursor = (cursor % SEED_ROWS) + 1) }));
  const ops = {
    empty: () => block(async () => undefined),
    read,
    conc64: () => Promise.all(Array.from({ length: 64 }, read)),
  };
  const measure = async () => {
    const calls = { empty: 0, read: 0, conc64: 0 };
    const samples = { empty: [] as number[], read: [] as number[], conc64: [] as number[] };
    const names = ["empty", "read", "conc64"] as const;
    for (const name of names) calls[name] = await calibrate(ops[name], batchMs);
    for (let i = 0; i < batches; i++) {
      for (const name of names) samples[name].push(await timeSerial(ops[name], calls[name]));
    }
    return { empty: median(samples.empty), read: median(samples.read), conc64: median(samples.conc64) };
  };
  const on = mode === "on";
  const figures = on ? await new AsyncLocalStorage<object>().run({ request: 1 }, measure) : await measure();
  await ds.destroy();
  return { node: process.version, als: on, ...figures };
}

main().then(
  (reply) => console.log(JSON.stringify(reply)),
  (error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  },
);
