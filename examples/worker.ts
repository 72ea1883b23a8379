/**
 * A background worker: pulls jobs from a table and processes each in its own
 * transaction, with decorated methods instead of blocks. On PostgreSQL several
 * workers share the queue with `FOR UPDATE SKIP LOCKED`; on SQLite the session
 * registry serializes their transactions on the one connection.
 *
 * Run it on embedded SQLite: `npm run build && npx tsc -p tsconfig.json && node build/examples/worker.js`
 */
import "reflect-metadata";
import { pathToFileURL } from "node:url";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";
import { createSessionRegistry, currentSession, Transactional, UsesSession } from "typeorm-scoped-session";

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

async function main(): Promise<void> {
  jobs.configure({ url: "sqlite::memory:", entities: [Job, LedgerEntry], synchronize: true });
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
