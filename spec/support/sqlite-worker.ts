/**
 * One process of the multi-process SQLite spec in ../sqlite-processes.spec.ts: run as
 * `node sqlite-worker.js <database-file> <blocks>`, with TSS_SQLITE_DRIVER choosing the
 * driver as in the other specs.
 *
 * It opens the file (whose tables and WAL mode the parent set up), prints `ready`, and
 * waits for one line on stdin, so that every process starts at once. Then it runs
 * `<blocks>` transactional blocks with `retry: 5`, one after another, each reading
 * before it writes: it reads the counter and the row count, inserts a note and sets the
 * counter to what it read plus one. At the end it prints one JSON line:
 * `{ pid, journalMode, committed, failed, retries, busy, errors, ms }`: `retries`, the
 * attempts after the first (each attempt is a session of its own); `busy`, the
 * SQLITE_BUSY and SQLITE_LOCKED errors seen (retried or not); `errors`, the first few
 * messages of blocks that failed for good.
 */
import "reflect-metadata";
import { once } from "node:events";
import { DataSource } from "typeorm";
import { createSessionRegistry, isRetryableError } from "../../src/index.js";
import { sqliteOptions } from "./sqlite.js";

const [file, count] = process.argv.slice(2);
const blocks = Number(count);
if (file === undefined || !Number.isInteger(blocks) || blocks < 1) {
  throw new Error("usage: sqlite-worker.js <database-file> <blocks>");
}

const dataSource = new DataSource(sqliteOptions(file, { synchronize: false, enableWAL: true }));
const db = createSessionRegistry({ name: `sqlite-worker-${process.pid}`, dataSource });
const [{ journal_mode: journalMode }] = await db.withSession((s) =>
  s.query<[{ journal_mode: string }]>("PRAGMA journal_mode"),
);
process.stdout.write("ready\n");
process.stdin.setEncoding("utf8");
await once(process.stdin, "data");

const seen = new WeakSet<object>();
let busy = 0;
/** Count a retryable error once, however often it is asked about. */
const sawRetryable = (error: unknown): boolean => {
  const retryable = isRetryableError(error);
  if (retryable && typeof error === "object" && error !== null && !seen.has(error)) {
    seen.add(error);
    busy += 1;
  }
  return retryable;
};
let sessions = 0;
db.on("open", () => (sessions += 1));
let committed = 0;
const errors: string[] = [];
const started = performance.now();
for (let i = 0; i < blocks; i++) {
  try {
    await db.withTransaction(
      async (s) => {
        const [{ value }] = await s.query<[{ value: number }]>("SELECT value FROM counter WHERE id = 1");
        const [{ n }] = await s.query<[{ n: number }]>("SELECT COUNT(*) AS n FROM notes");
        await s.query("INSERT INTO notes (body, block) VALUES (?, ?)", [`${process.pid}:${i}`, n]);
        await s.query("UPDATE counter SET value = ? WHERE id = 1", [value + 1]);
      },
      { retry: { retries: 5, retryOn: sawRetryable } },
    );
    committed += 1;
  } catch (error) {
    sawRetryable(error);
    if (errors.length < 5) errors.push(error instanceof Error ? error.message : String(error));
  }
}
const ms = Math.round(performance.now() - started);
await db.drain({ timeoutMs: 5_000, destroy: true });
process.stdin.destroy();
const summary = { pid: process.pid, journalMode, committed, failed: blocks - committed, retries: sessions - blocks };
process.stdout.write(`${JSON.stringify({ ...summary, busy, errors, ms })}\n`);
