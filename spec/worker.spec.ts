import { expect } from "chai";
import { type AddressInfo, createServer } from "node:net";
import { DataSource, type DataSourceOptions } from "typeorm";
import { findRedis, Job, jobs, JobWorker, LedgerEntry, runBullmqJobs, runWorkers } from "../examples/worker.js";
import { type Backend, connectionsInUse, forEachBackend } from "./support/backends.js";
import { SQLITE_DRIVER, TempSqlite } from "./support/sqlite.js";
import { freshDatabase } from "./support/postgres-hooks.js";
import { type RedisServer, startRedis } from "./support/redis.js";

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

  describe("with BullMQ", () => {
    let redis: RedisServer | undefined;
    before(async function () {
      this.timeout(20_000);
      redis = await startRedis();
      if (redis === undefined) this.skip();
    });
    after(() => redis?.stop());

    it("finds Redis by URL, and says nothing is there when nothing answers", async () => {
      expect(await findRedis(redis!.url)).to.include({ host: redis!.host, port: redis!.port });
      const closed = await new Promise<number>((resolve) => {
        const probe = createServer().listen(0, "127.0.0.1", () => {
          const { port } = probe.address() as AddressInfo;
          probe.close(() => resolve(port));
        });
      });
      expect(await findRedis(`redis://127.0.0.1:${closed}`)).to.equal(undefined);
    });

    it("processes every job once, after the COMMIT that stored its row, each in its own transaction", async function () {
      this.timeout(60_000);
      const amounts = Array.from({ length: 12 }, (_, i) => i + 1);
      const fails = (i: number) => i % 5 === 3;
      const { rows, addedByRollback } = await runBullmqJobs((await findRedis(redis!.url))!, amounts, fails);
      expect(addedByRollback).to.equal(0);
      expect(rows.map((j) => j.status)).to.deep.equal(amounts.map((_, i) => (fails(i) ? "failed" : "done")));
      const ledger = await jobs.withSession((s) => s.getRepository(LedgerEntry).find());
      // A failed job's ledger entry was rolled back with its transaction.
      expect(ledger.map((e) => e.job).sort((a, b) => a - b)).to.deep.equal(
        rows.filter((j) => j.status === "done").map((j) => j.id),
      );
      expect(jobs.stats().active).to.equal(0);
      expect(connectionsInUse(dataSource)).to.equal(0);
    });
  });
});
