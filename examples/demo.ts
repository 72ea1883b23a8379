/**
 * The demo behind `npm run demo`: typeorm-scoped-session on embedded SQLite, no setup.
 *
 * It shows a plain session block, a transaction that commits, one that rolls back,
 * a savepoint, and what happens to 8 concurrent transactions on SQLite's single
 * connection with raw TypeORM and with session blocks; then the three kinds of unit
 * of work: web requests (the Express example), cron ticks (the node-cron example)
 * and a background worker's batch (the worker example: BullMQ when Redis answers at
 * REDIS_URL or 127.0.0.1:6379, else a queue in a table).
 */
import "reflect-metadata";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";
import {
  configureSessions,
  currentSession,
  defaultRegistry,
  type SessionEventName,
  type SessionRegistry,
  withSession,
  withTransaction,
} from "typeorm-scoped-session";
import { runCronJob } from "./cron-job.js";
import { createRegistry, start } from "./express-app.js";
import { findRedis, Job, jobs, JobWorker, LedgerEntry, REDIS_URL, runBullmqJobs, runWorkers } from "./worker.js";

@Entity("notes")
class Note {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  body!: string;
}

const say = (line: string) => console.log(line);
const step = (title: string) => say(`\n== ${title}`);

configureSessions({ url: "sqlite::memory:", entities: [Note], synchronize: true });

// Show the session lifecycle as it happens.
let quiet = false;
for (const event of ["open", "connect", "begin", "commit", "rollback", "close"] satisfies SessionEventName[]) {
  defaultRegistry.on(event, ({ session, savepoint, durationMs }) => {
    if (quiet) return;
    const extra = durationMs === undefined ? "" : ` after ${durationMs.toFixed(1)} ms`;
    say(`   [${String(session)}] ${savepoint ? `${event} (savepoint)` : event}${extra}`);
  });
}

/** Deep inside the app: no session parameter, the scope provides it. */
async function countNotes(): Promise<number> {
  return currentSession().getRepository(Note).count();
}

async function main(): Promise<void> {
  step("withSession: a read, connection taken on first query and released at the end");
  say(`   notes: ${await withSession(() => countNotes(), { name: "count" })}`);

  step("withSession that never touches the database: no connection at all");
  await withSession(() => say("   (pure computation)"), { name: "no-db" });

  step("withTransaction that commits; afterCommit runs once it is durable");
  await withTransaction(
    async (s) => {
      await s.getRepository(Note).save([{ body: "first" }, { body: "second" }]);
      s.afterCommit(() => say("   afterCommit: 2 notes are now visible to everyone"));
    },
    { name: "add-notes" },
  );

  step("withTransaction that throws: rolled back, the error is the body's own");
  try {
    await withTransaction(
      async (s) => {
        await s.getRepository(Note).save({ body: "never stored" });
        throw new Error("payment declined");
      },
      { name: "checkout" },
    );
  } catch (error) {
    say(`   caught: ${(error as Error).message}; notes: ${await withSession(countNotes)}`);
  }

  step("a nested transactional block is a SAVEPOINT: its failure undoes only its own work");
  await withTransaction(
    async (s) => {
      await s.getRepository(Note).save({ body: "kept" });
      await withTransaction(async (inner) => {
        await inner.getRepository(Note).save({ body: "undone" });
        throw new Error("inner step failed");
      }).catch((error: Error) => say(`   inner block rejected: ${error.message}`));
    },
    { name: "import" },
  );
  say(`   notes: ${await withSession(countNotes)} (first, second, kept)`);

  step("8 concurrent transactions on SQLite's one connection, the odd ones throwing");
  quiet = true;
  const dataSource = defaultRegistry.dataSource!;
  const before = await withSession(countNotes);
  const raw = await Promise.allSettled(
    Array.from({ length: 8 }, (_, i) =>
      dataSource.transaction(async (m) => {
        await m.save(Note, { body: `raw ${i}` });
        await new Promise((resolve) => setImmediate(resolve));
        if (i % 2 === 1) throw new Error(`odd ${i}`);
      }),
    ),
  );
  const rawRows = (await withSession(countNotes)) - before;
  say(
    `   raw dataSource.transaction(): ${raw.filter((r) => r.status === "fulfilled").length} of 4 even ones resolved, ` +
      `${rawRows} rows stored (should be 4)`,
  );
  const ours = await Promise.allSettled(
    Array.from({ length: 8 }, (_, i) =>
      withTransaction(async (s) => {
        await s.getRepository(Note).save({ body: `block ${i}` });
        await new Promise((resolve) => setImmediate(resolve));
        if (i % 2 === 1) throw new Error(`odd ${i}`);
      }),
    ),
  );
  const ourRows = (await withSession(countNotes)) - before - rawRows;
  say(
    `   withTransaction():            ${ours.filter((r) => r.status === "fulfilled").length} of 4 even ones resolved, ` +
      `${ourRows} rows stored (should be 4)`,
  );
  quiet = false;

  const stats = defaultRegistry.stats();
  step("registry stats");
  say(`   ${JSON.stringify(stats)}`);
  await dataSource.destroy();
  if (ourRows !== 4 || stats.active !== 0) throw new Error("the demo did not end as it should");

  await web();
  await ticks();
  await worker();
  say("\nAll units of work ended with their sessions closed.");
}

/** What a registry did, in one line. */
function summary(registry: SessionRegistry): string {
  const { opened, closed, active, commits, rollbacks } = registry.stats();
  return `sessions opened ${opened}, closed ${closed}, still open ${active}; commits ${commits}, rollbacks ${rollbacks}`;
}

async function web(): Promise<void> {
  step("web: the Express example, one session per request (sessionMiddleware)");
  const registry = createRegistry();
  const { server, url } = await start(registry);
  const send = async (method: string, path: string, body?: unknown): Promise<string> => {
    const response = await fetch(`${url}${path}`, {
      method,
      headers: body === undefined ? {} : { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return `${method} ${path} -> ${response.status} ${await response.text()}`;
  };
  say(`   ${await send("GET", "/health")}   (no database work: no session connected)`);
  say(`   ${await send("POST", "/todos", { title: "milk" })}`);
  say(`   ${await send("POST", "/todos", {})}   (rejected before any write)`);
  say(`   ${await send("POST", "/todos/1/done")}`);
  say(`   ${await send("GET", "/todos")}`);
  await new Promise<void>((resolve) => server.close(() => resolve()));
  say(`   ${summary(registry)}`);
  const { forced } = await registry.drain({ destroy: true });
  if (registry.stats().active !== 0 || forced !== 0) throw new Error("a request left its session open");
}

async function ticks(): Promise<void> {
  step("cron: two ticks of a node-cron task (sessionTask + DatabaseRunCoordinator)");
  const result = await runCronJob(2, (line) => say(`   ${line}`));
  say(`   leases taken: ${result.leases.join(", ")}; heartbeats stored: ${result.heartbeats}`);
  if (result.heartbeats !== result.ticks.length) throw new Error("a tick did not commit");
}

async function worker(): Promise<void> {
  jobs.configure({ url: "sqlite::memory:", entities: [Job, LedgerEntry], synchronize: true });
  const redis = await findRedis();
  if (redis !== undefined) {
    step(`worker: BullMQ on ${REDIS_URL}, jobs added after the COMMIT, each run in its own transaction`);
    const { rows, addedByRollback } = await runBullmqJobs(redis, [10, 20, 30, 40, 50], (i) => i === 2);
    say(`   jobs added by a transaction that rolled back: ${addedByRollback}`);
    say(`   ${rows.map((j) => `#${j.id} ${j.status}${j.error === null ? "" : ` (${j.error})`}`).join(", ")}`);
  } else {
    step("worker: a batch of queued jobs, each in its own transaction (@Transactional)");
    say(`   (no Redis at ${REDIS_URL}, set REDIS_URL for the BullMQ version: using a queue in a table)`);
    await JobWorker.enqueue([10, 20, 30, 40, 50], (i) => i === 2);
    const taken = await runWorkers(2);
    const results = await jobs.withSession((s) => s.getRepository(Job).find({ order: { id: "ASC" } }));
    say(`   jobs taken per worker: ${taken.join(", ")}`);
    say(`   ${results.map((j) => `#${j.id} ${j.status}${j.error === null ? "" : ` (${j.error})`}`).join(", ")}`);
  }
  say(`   ${summary(jobs)}`);
  await jobs.drain({ destroy: true });
}

await main();
