import { expect } from "chai";
import { DataSource, type DataSourceOptions } from "typeorm";
import { Job, jobs, JobWorker, LedgerEntry, runWorkers } from "../examples/worker.js";
import { type Backend, connectionsInUse, forEachBackend } from "./support/backends.js";
import { SQLITE_DRIVER, TempSqlite } from "./support/sqlite.js";
import { freshDatabase } from "./support/postgres-hooks.js";

// The example imports the package by name (its build in dist/), so this spec uses only
// the example's own registry and classes.
forEachBackend("example: background worker", (backend: Backend) => {
  let dataSource: DataSource;
  let sqlite: TempSqlite | undefined;

  beforeEach(async () => {
    const options =
      backend.kind === "postgres"
        ? { type: "postgres", url: await freshDatabase("worker"), extra: { max: 5 } }
        : { type: SQLITE_DRIVER, database: (sqlite = new TempSqlite()).path };
    dataSource = new DataSource({ ...options, entities: [Job, LedgerEntry], synchronize: true } as DataSourceOptions);
    jobs.configure({ dataSource });
  });
  afterEach(async () => {
    await jobs.drain({ destroy: true });
    await sqlite?.dispose();
    sqlite = undefined;
  });

  it("three workers process every job exactly once, each in its own transaction", async function () {
    this.timeout(60_000);
    const amounts = Array.from({ length: 60 }, (_, i) => i + 1);
    const fails = (i: number) => i % 7 === 3;
    await JobWorker.enqueue(amounts, fails);
    const taken = await runWorkers(3);
    expect(taken.reduce((a, b) => a + b, 0)).to.equal(60);
    if (backend.kind === "postgres")
      expect(taken.filter((n) => n > 0).length, "SKIP LOCKED shares the queue").to.be.above(1);
    const [all, ledger] = await jobs.withSession(async (s) => [
      await s.getRepository(Job).find({ order: { id: "ASC" } }),
      await s.getRepository(LedgerEntry).find(),
    ]);
    expect(all.map((j) => j.status)).to.deep.equal(amounts.map((_, i) => (fails(i) ? "failed" : "done")));
    // A failed job's ledger entry was undone with its savepoint; every other job is in the ledger once.
    expect(ledger.map((e) => e.job).sort((a, b) => a - b)).to.deep.equal(
      all.filter((j) => j.status === "done").map((j) => j.id),
    );
    expect(all.filter((j) => j.status === "failed").every((j) => /exploded/.test(j.error ?? ""))).to.equal(true);
    expect(jobs.stats().active).to.equal(0);
    expect(connectionsInUse(dataSource)).to.equal(0);
  });

  it("drain() stops the registry once the workers have finished", async () => {
    await JobWorker.enqueue([1, 2, 3]);
    const stop = new AbortController();
    const worker = new JobWorker(1);
    const running = worker.runUntilEmpty(stop.signal);
    stop.abort();
    await running;
    expect(await jobs.drain({ timeoutMs: 1000 })).to.deep.equal({ waited: 0, forced: 0 });
  });
});
