/**
 * A background worker, two ways.
 *
 * With Redis (REDIS_URL, default redis://127.0.0.1:6379): BullMQ. A transaction stores
 * the job rows and enqueues one BullMQ job per row with `addAfterCommit`, so a job is
 * never processed before its row is committed; a `Worker` runs each job in its own
 * transaction with `sessionProcessor`.
 *
 * Without Redis: a queue in a table. Each job is claimed and processed in its own
 * transaction, with decorated methods instead of blocks. On PostgreSQL several
 * workers share the queue with `FOR UPDATE SKIP LOCKED`; on SQLite the session
 * registry serializes their transactions on the one connection.
 *
 * Run it on embedded SQLite: `npm run build && npx tsc -p tsconfig.json && node build/examples/worker.js`
 */
import "reflect-metadata";
import { connect } from "node:net";
import { pathToFileURL } from "node:url";
import { type ConnectionOptions, Queue, Worker } from "bullmq";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";
import { createSessionRegistry, currentSession, Transactional, UsesSession } from "typeorm-scoped-session";
import { addAfterCommit, sessionProcessor } from "typeorm-scoped-session/bullmq";

@Entity("jobs")
export class Job {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  kind!: string;

  @Column("integer")
  amount!: number;

  /** queued, done or failed */
  @Column("text", { default: "queued" })
  status!: string;

  @Column("text", { nullable: true })
  error!: string | null;

  @Column("integer", { default: 0 })
  worker!: number;
}

@Entity("ledger")
export class LedgerEntry {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("integer")
  job!: number;

  @Column("integer")
  amount!: number;
}

/** The worker's registry: bound to a DataSource later, by whoever starts the worker. */
export const jobs = createSessionRegistry({ name: "worker" });

export class JobWorker {
  readonly id: number;
  processed = 0;

  constructor(id: number) {
    this.id = id;
  }

  /** Enqueue jobs; `fail` makes a job's handler throw. */
  @Transactional({ registry: jobs })
  static async enqueue(amounts: number[], fail: (i: number) => boolean = () => false): Promise<void> {
    await currentSession(jobs)
      .getRepository(Job)
      .insert(amounts.map((amount, i) => ({ kind: fail(i) ? "explode" : "credit", amount })));
  }

  /**
   * Claim the next queued job and run it, in one transaction: the claim, the work
   * and the status commit together, or not at all. Returns false when the queue is empty.
   */
  @Transactional({ registry: jobs })
  async processNext(): Promise<boolean> {
    const s = currentSession(jobs);
    const postgres = s.manager.connection.options.type === "postgres";
    const rows = await s.query<{ id: number }[]>(
      postgres
        ? "SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
        : "SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1",
    );
    const id = rows[0]?.id;
    if (id === undefined) return false;
    const job = await s.getRepository(Job).findOneByOrFail({ id });
    try {
      await this.handle(job);
      await s.getRepository(Job).update(job.id, { status: "done", worker: this.id });
    } catch (error) {
      // The handler's own writes are undone (its savepoint); the failure is recorded.
      await s.getRepository(Job).update(job.id, { status: "failed", error: String(error), worker: this.id });
    }
    this.processed += 1;
    return true;
  }

  /** The job itself, in a savepoint of processNext's transaction. */
  @Transactional({ registry: jobs })
  async handle(job: Job): Promise<void> {
    await currentSession(jobs).getRepository(LedgerEntry).insert({ job: job.id, amount: job.amount });
    if (job.kind === "explode") throw new Error(`job ${job.id} exploded`);
  }

  /** Process jobs until the queue is empty or `stop()` is called. */
  @UsesSession({ registry: jobs })
  async runUntilEmpty(signal?: AbortSignal): Promise<number> {
    let count = 0;
    while (signal?.aborted !== true && (await this.processNext())) count += 1;
    return count;
  }
}

/** Run `workers` workers side by side until the queue is empty; how many jobs each took. */
export async function runWorkers(workers: number): Promise<number[]> {
  const pool = Array.from({ length: workers }, (_, i) => new JobWorker(i + 1));
  return Promise.all(pool.map((w) => w.runUntilEmpty()));
}

/** Where the example looks for Redis: REDIS_URL, else the default local server. */
export const REDIS_URL = process.env.REDIS_URL ?? "redis://127.0.0.1:6379";

/**
 * BullMQ connection options for the Redis at `url` when it answers a PING within
 * `timeoutMs`; `undefined` when it does not (not running, refused, wrong password).
 */
export async function findRedis(url = REDIS_URL, timeoutMs = 500): Promise<ConnectionOptions | undefined> {
  const { hostname, port, username, password, pathname } = new URL(url);
  const options = {
    host: hostname || "127.0.0.1",
    port: Number(port || 6379),
    ...(username === "" ? {} : { username: decodeURIComponent(username) }),
    ...(password === "" ? {} : { password: decodeURIComponent(password) }),
    db: Number(pathname.slice(1) || 0),
    maxRetriesPerRequest: null,
  };
  const auth = password === "" ? "" : `AUTH ${username === "" ? "" : `${username} `}${password}\r\n`;
  const answered = await new Promise<boolean>((resolve) => {
    const socket = connect({ host: options.host, port: options.port });
    let reply = "";
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once("error", () => done(false));
    socket.once("connect", () => socket.write(`${auth}PING\r\n`));
    socket.on("data", (chunk) => {
      reply += chunk.toString();
      if (reply.includes("+PONG")) done(true);
      else if (reply.includes("-")) done(false);
    });
  });
  return answered ? options : undefined;
}

/** What {@link runBullmqJobs} observed. */
export interface BullmqRun {
  /** The jobs' rows, by id, with their final status. */
  rows: Job[];
  /** Jobs added by a transaction that rolled back: always 0. */
  addedByRollback: number;
}

/**
 * Store one job row per amount and enqueue a BullMQ job for each after the COMMIT,
 * process them with a `Worker` (each job in its own transaction), and record failures.
 * `fail(i)` makes the i-th job's handler throw: its transaction rolls back and BullMQ
 * marks it failed. Resolves once every job has completed or failed (bounded by `timeoutMs`).
 */
export async function runBullmqJobs(
  connection: ConnectionOptions,
  amounts: number[],
  fail: (i: number) => boolean = () => false,
  timeoutMs = 30_000,
): Promise<BullmqRun> {
  const queue = new Queue<{ id: number }>(`ledger-${process.pid}-${Date.now()}`, { connection });
  let settled = 0;
  let allSettled!: () => void;
  const finished = new Promise<void>((resolve) => (allSettled = resolve));
  const recording: Promise<unknown>[] = [];
  const worker = new Worker<{ id: number }>(
    queue.name,
    sessionProcessor(
      async (s, job) => {
        const row = await s.getRepository(Job).findOneByOrFail({ id: job.data.id });
        await s.getRepository(LedgerEntry).insert({ job: row.id, amount: row.amount });
        if (row.kind === "explode") throw new Error(`job ${row.id} exploded`);
        await s.getRepository(Job).update(row.id, { status: "done", worker: 1 });
      },
      { transaction: true, registry: jobs },
    ),
    { connection, concurrency: 2 },
  );
  const count = (): void => {
    settled += 1;
    if (settled === amounts.length) allSettled();
  };
  worker.on("completed", count);
  worker.on("failed", (job, error) => {
    // The job's own transaction rolled back; the failure is recorded in a new one.
    const id = job?.data.id;
    recording.push(
      jobs
        .withTransaction((s) => s.getRepository(Job).update({ id }, { status: "failed", error: String(error) }))
        .finally(count),
    );
  });
  try {
    let addedByRollback: Promise<unknown> | undefined;
    await jobs
      .withTransaction(async (s) => {
        await s.getRepository(Job).insert({ kind: "credit", amount: 0 });
        addedByRollback = addAfterCommit(queue, "credit", { id: 0 }, undefined, { registry: jobs });
        throw new Error("changed my mind");
      })
      .catch(() => undefined);
    await jobs.withTransaction(async (s) => {
      const rows = await s
        .getRepository(Job)
        .save(amounts.map((amount, i) => ({ kind: fail(i) ? "explode" : "credit", amount })));
      // Not awaited here: the jobs are added after the COMMIT, before this block settles.
      for (const row of rows) void addAfterCommit(queue, row.kind, { id: row.id }, undefined, { registry: jobs });
    });
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      finished,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`jobs not done after ${timeoutMs} ms`)), timeoutMs);
      }),
    ]).finally(() => clearTimeout(timer));
    await Promise.all(recording);
    const rows = await jobs.withSession((s) => s.getRepository(Job).find({ order: { id: "ASC" } }));
    return { rows, addedByRollback: (await addedByRollback) === undefined ? 0 : 1 };
  } finally {
    // Shutdown order: no new job may start on a registry that drains.
    await worker.close();
    await queue.obliterate({ force: true }).catch(() => undefined);
    await queue.close();
  }
}

async function main(): Promise<void> {
  jobs.configure({ url: "sqlite::memory:", entities: [Job, LedgerEntry], synchronize: true });
  const redis = await findRedis();
  if (redis !== undefined) {
    console.log(`BullMQ on ${REDIS_URL}`);
    const { rows } = await runBullmqJobs(redis, [10, 20, 30, 40], (i) => i === 2);
    console.log(`processed ${rows.length} jobs:`, rows.map((j) => `#${j.id} ${j.status}`).join(", "));
    await jobs.drain({ destroy: true });
    return;
  }
  console.log(`No Redis at ${REDIS_URL} (set REDIS_URL): using the table queue`);
  const stop = new AbortController();
  process.once("SIGTERM", () => {
    stop.abort();
    void jobs.drain({ timeoutMs: 5_000, destroy: true });
  });
  await JobWorker.enqueue([10, 20, 30, 40], (i) => i === 2);
  const worker = new JobWorker(1);
  const done = await worker.runUntilEmpty(stop.signal);
  const results = await jobs.withSession((s) => s.getRepository(Job).find({ order: { id: "ASC" } }));
  console.log(`processed ${done} jobs:`, results.map((j) => `#${j.id} ${j.status}`).join(", "));
  await jobs.drain({ destroy: true });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) await main();
