import { expect } from "chai";
import { Job, Queue, QueueEvents, Worker, type ConnectionOptions } from "bullmq";
import {
  createSessionRegistry,
  RegistryClosedError,
  type Session,
  SessionTimeoutError,
  type SessionRegistry,
} from "../src/index.js";
import { addAfterCommit, sessionProcessor } from "../src/integrations/bullmq.js";
import { useTransactionalTests } from "../src/testing/index.js";
import { type Backend, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { startRedis, type RedisServer } from "./support/redis.js";
import { deferred, rejectionOf, turns } from "./support/util.js";

class Boom extends Error {}

/** Bound of every wait for a job. */
const TTL = 15_000;

let redis: RedisServer | undefined;
let queues = 0;

/** A queue, its events and workers on the run's Redis, closed by `close()`. */
class Harness {
  readonly connection: ConnectionOptions;
  readonly queue: Queue;
  readonly events: QueueEvents;
  readonly workers: Worker[] = [];

  constructor(server: RedisServer) {
    this.connection = { host: server.host, port: server.port, maxRetriesPerRequest: null };
    const name = `q${++queues}`;
    this.queue = new Queue(name, { connection: this.connection });
    this.events = new QueueEvents(name, { connection: this.connection });
  }

  async ready(): Promise<void> {
    await Promise.all([this.queue.waitUntilReady(), this.events.waitUntilReady()]);
  }

  worker<T, R>(processor: (job: Job<T, R>) => Promise<R>, concurrency = 1): Worker<T, R> {
    const worker = new Worker<T, R>(this.queue.name, processor, { connection: this.connection, concurrency });
    this.workers.push(worker);
    return worker;
  }

  async jobs(): Promise<number> {
    return this.queue.count();
  }

  async close(): Promise<void> {
    for (const worker of this.workers) await worker.close();
    await this.events.close();
    await this.queue.close();
  }
}

describe("bullmq", function () {
  before(async function () {
    this.timeout(20_000);
    redis = await startRedis();
    if (redis === undefined) this.skip();
  });
  after(async () => {
    await redis?.stop();
    redis = undefined;
  });

  forEachBackend("sessionProcessor()", (backend: Backend) => {
    let db: TestDb;
    let reg: SessionRegistry;
    let h: Harness;
    const count = () => reg.withSession((s) => s.getRepository(Note).count());

    before(async () => {
      db = await backend.open();
    });
    after(() => db.dispose());
    beforeEach(async () => {
      reg = db.registry(`bullmq-${backend.kind}`);
      await reg.withSession((s) => s.query("DELETE FROM notes"));
      h = new Harness(redis!);
      await h.ready();
    });
    afterEach(async () => {
      await h.close();
      await reg.drain({ timeoutMs: 5_000 });
    });

    it("runs each job in a session and a transaction of its own, committed on success", async () => {
      h.worker(
        sessionProcessor(
          async (s, job: Job<{ body: string }>) => {
            await s.getRepository(Note).insert({ body: job.data.body });
            return { session: s.id, inTransaction: s.inTransaction, name: s.name };
          },
          { transaction: true, registry: reg },
        ),
      );
      const job = await h.queue.add("note", { body: "from a job" });
      const result = (await job.waitUntilFinished(h.events, TTL)) as Record<string, unknown>;
      expect(result).to.include({ inTransaction: true, name: `${h.queue.name}:note` });
      expect(await count()).to.equal(1);
      expect(reg.stats()).to.include({ commits: 1, active: 0 });
    });

    it("never joins the scope of the code that created the worker", async () => {
      let creator: Session | undefined;
      await reg.withTransaction(async (s) => {
        creator = s;
        h.worker(sessionProcessor(async (job) => job.id, { transaction: true, registry: reg }));
      });
      const job = await h.queue.add("probe", {});
      const id: unknown = await job.waitUntilFinished(h.events, TTL);
      expect(creator!.closed).to.equal(true);
      expect(id).to.be.a("number").and.not.equal(creator!.id);
    });

    it("fails the job with the body's own error once the rollback and afterRollback are done", async () => {
      const log: string[] = [];
      const thrown = new Boom("card declined");
      const worker = h.worker(
        sessionProcessor(
          async (s) => {
            await s.getRepository(Note).insert({ body: "undone" });
            s.afterRollback(async () => {
              await turns(3);
              log.push("afterRollback");
            });
            throw thrown;
          },
          { transaction: true, registry: reg },
        ),
      );
      const failed = new Promise<unknown>((resolve) =>
        worker.on("failed", (_job, error) => {
          log.push("failed");
          resolve(error);
        }),
      );
      const job = await h.queue.add("charge", {});
      const error = await rejectionOf(job.waitUntilFinished(h.events, TTL));
      expect((error as Error).message).to.equal("card declined");
      expect(await failed).to.equal(thrown);
      expect(log).to.deep.equal(["afterRollback", "failed"]);
      expect(await count()).to.equal(0);
      expect(reg.stats()).to.include({ rollbacks: 1, active: 0 });
    });

    it("runs each attempt of a retried job in a fresh transaction", async () => {
      const sessions: number[] = [];
      h.worker(
        sessionProcessor(
          async (s, job) => {
            sessions.push(s.id);
            await s.getRepository(Note).insert({ body: `attempt ${job.attemptsMade + 1}` });
            if (job.attemptsMade === 0) throw new Boom("first attempt");
            return s.getRepository(Note).count();
          },
          { transaction: true, registry: reg },
        ),
      );
      const job = await h.queue.add("flaky", {}, { attempts: 2 });
      // The first attempt's row was rolled back: the second one sees only its own.
      expect(await job.waitUntilFinished(h.events, TTL)).to.equal(1);
      expect(sessions).to.have.length(2);
      expect(new Set(sessions).size).to.equal(2);
      expect((await reg.withSession((s) => s.getRepository(Note).find())).map((n) => n.body)).to.deep.equal([
        "attempt 2",
      ]);
    });

    if (backend.kind === "postgres") {
      it("runs concurrent jobs in distinct sessions at the same time", async () => {
        const inside = new Set<number>();
        const all = deferred();
        const timer = setTimeout(() => all.resolve(), TTL);
        h.worker(
          sessionProcessor(
            async (s) => {
              await s.getRepository(Note).insert({ body: `session ${s.id}` });
              inside.add(s.id);
              if (inside.size === 3) all.resolve();
              await all.promise;
              return inside.size;
            },
            { transaction: true, registry: reg },
          ),
          3,
        );
        const jobs = await h.queue.addBulk([1, 2, 3].map((n) => ({ name: "c", data: { n } })));
        const seen = await Promise.all(jobs.map((job) => job.waitUntilFinished(h.events, TTL)));
        clearTimeout(timer);
        expect(seen).to.deep.equal([3, 3, 3]);
        expect(await count()).to.equal(3);
      });
    } else {
      it("serializes concurrent jobs' transactions on SQLite's one connection", async () => {
        let inside = 0;
        let most = 0;
        h.worker(
          sessionProcessor(
            async (s) => {
              inside += 1;
              most = Math.max(most, inside);
              await s.getRepository(Note).insert({ body: `session ${s.id}` });
              await turns(5);
              inside -= 1;
            },
            { transaction: true, registry: reg },
          ),
          3,
        );
        const jobs = await h.queue.addBulk([1, 2, 3].map((n) => ({ name: "c", data: { n } })));
        await Promise.all(jobs.map((job) => job.waitUntilFinished(h.events, TTL)));
        expect(most).to.equal(1);
        expect(await count()).to.equal(3);
      });
    }

    it("a job that runs past timeoutMs fails with SessionTimeoutError, its work rolled back", async () => {
      const worker = h.worker(
        sessionProcessor(
          async (s) => {
            await s.getRepository(Note).insert({ body: "too slow" });
            await new Promise((resolve) => s.signal.addEventListener("abort", resolve, { once: true }));
          },
          { transaction: true, timeoutMs: 200, registry: reg },
        ),
      );
      const failed = new Promise<unknown>((resolve) => worker.on("failed", (_job, error) => resolve(error)));
      await h.queue.add("slow", {});
      expect(await failed).to.be.instanceOf(SessionTimeoutError);
      expect(await count()).to.equal(0);
    });

    it("once the registry drains, a job fails with RegistryClosedError and runs no body", async () => {
      let ran = false;
      const worker = h.worker(
        sessionProcessor(
          () => {
            ran = true;
          },
          { registry: reg },
        ),
      );
      const failed = new Promise<unknown>((resolve) => worker.on("failed", (_job, error) => resolve(error)));
      await reg.drain();
      await h.queue.add("late", {});
      expect(await failed).to.be.instanceOf(RegistryClosedError);
      expect(ran).to.equal(false);
    });

    it("refuses propagation mandatory and a body that is not a function", () => {
      expect(() => sessionProcessor(async () => 1, { propagation: "mandatory" })).to.throw(TypeError, /no scope/);
      expect(() => sessionProcessor(42 as never)).to.throw(TypeError, /function/);
    });
  });

  forEachBackend("addAfterCommit()", (backend: Backend) => {
    let db: TestDb;
    const reg = createSessionRegistry({ name: `after-commit-${backend.kind}` });
    let h: Harness;

    before(async () => {
      db = await backend.open();
      reg.configure({ dataSource: db.dataSource() });
    });
    after(async () => {
      await reg.drain({ timeoutMs: 5_000 });
      await db.dispose();
    });
    beforeEach(async () => {
      h = new Harness(redis!);
      await h.ready();
    });
    afterEach(() => h.close());

    const add = (data: unknown) => addAfterCommit(h.queue, "welcome", data, undefined, { registry: reg });

    it("adds the job after the COMMIT; the worker sees the committed rows", async () => {
      h.worker(
        sessionProcessor(
          async (s, job: Job<{ id: number }>) => (await s.getRepository(Note).findOneBy(job.data))?.body,
          {
            registry: reg,
          },
        ),
      );
      let pending: Promise<Job | undefined> | undefined;
      let inside = -1;
      await reg.withTransaction(async (s) => {
        const { id } = await s.getRepository(Note).save({ body: "ada" });
        pending = add({ id });
        inside = await h.jobs();
      });
      expect(inside, "no job before the COMMIT").to.equal(0);
      const job = await pending!;
      expect(job).to.be.instanceOf(Job);
      expect(await job!.waitUntilFinished(h.events, TTL)).to.equal("ada");
    });

    it("the committing block settles once the job is in the queue", async () => {
      let added = false;
      const slow = Object.assign(Object.create(h.queue) as Queue, {
        add: async (...args: Parameters<Queue["add"]>) => {
          const job = await h.queue.add(...args);
          await turns(5);
          added = true;
          return job;
        },
      });
      await reg.withTransaction(() => void addAfterCommit(slow, "welcome", { n: 1 }, undefined, { registry: reg }));
      expect(added).to.equal(true);
      expect(await h.jobs()).to.equal(1);
    });

    it("drops the job when the transaction rolls back, resolving undefined", async () => {
      let pending: Promise<Job | undefined> | undefined;
      const error = await rejectionOf(
        reg.withTransaction(async () => {
          pending = add({ n: 1 });
          throw new Boom("rolled back");
        }),
      );
      expect(error).to.be.instanceOf(Boom);
      expect(await pending).to.equal(undefined);
      expect(await h.jobs()).to.equal(0);
    });

    it("drops the job of a savepoint that rolls back while the outer transaction commits", async () => {
      let outer: Promise<Job | undefined> | undefined;
      let inner: Promise<Job | undefined> | undefined;
      await reg.withTransaction(async () => {
        outer = add({ level: "outer" });
        await rejectionOf(
          reg.withTransaction(async () => {
            inner = add({ level: "inner" });
            throw new Boom("inner");
          }),
        );
      });
      expect(await inner).to.equal(undefined);
      expect((await outer)?.data).to.deep.equal({ level: "outer" });
      expect(await h.jobs()).to.equal(1);
    });

    it("drops the job of a released savepoint when the outer transaction rolls back", async () => {
      let inner: Promise<Job | undefined> | undefined;
      await rejectionOf(
        reg.withTransaction(async () => {
          await reg.withTransaction(() => void (inner = add({ level: "inner" })));
          throw new Boom("outer");
        }),
      );
      expect(await inner).to.equal(undefined);
      expect(await h.jobs()).to.equal(0);
    });

    it("resolves undefined for the call of an attempt that `retry` re-runs; the attempt that commits adds its job", async () => {
      const calls: Promise<Job | undefined>[] = [];
      await reg.withTransaction(
        async () => {
          calls.push(add({ attempt: calls.length + 1 }));
          if (calls.length === 1) throw new Boom("retry me");
        },
        { retry: { retries: 1, baseDelayMs: 1, retryOn: (error) => error instanceof Boom } },
      );
      expect(calls).to.have.length(2);
      expect(await calls[0]).to.equal(undefined);
      expect((await calls[1])?.data).to.deep.equal({ attempt: 2 });
      expect(await h.jobs()).to.equal(1);
    });

    it("adds at once outside a transaction, and with no session at all", async () => {
      const inSession = await reg.withSession(async () => {
        const job = await add({ where: "session" });
        return job;
      });
      expect(inSession).to.be.instanceOf(Job);
      expect(await add({ where: "nowhere" })).to.be.instanceOf(Job);
      expect(await h.jobs()).to.equal(2);
    });

    it("rejects a queue without add() and a registry that is not one", async () => {
      expect(await rejectionOf(addAfterCommit({} as never, "x", {}))).to.be.instanceOf(TypeError);
      expect(
        await rejectionOf(addAfterCommit(h.queue, "x", {}, undefined, { registry: {} as never })),
      ).to.be.instanceOf(TypeError);
    });

    it("rejects, and reports through `error`, when adding after the COMMIT fails", async () => {
      const reported: unknown[] = [];
      const listener = ({ error }: { error?: unknown }) => reported.push(error);
      reg.on("error", listener);
      const broken = { add: () => Promise.reject(new Boom("redis down")), name: "broken" } as unknown as Queue;
      let pending: Promise<Job | undefined> | undefined;
      await reg.withTransaction(() => void (pending = addAfterCommit(broken, "x", {}, undefined, { registry: reg })));
      reg.off("error", listener);
      expect(await rejectionOf(pending!)).to.be.instanceOf(Boom);
      expect(reported).to.have.length(1);
    });

    describe("under useTransactionalTests()", () => {
      useTransactionalTests({ registry: reg, hooks: { beforeEach, afterEach } });
      it("adds the job when the block's savepoint is released", async () => {
        let pending: Promise<Job | undefined> | undefined;
        await reg.withTransaction(() => void (pending = add({ n: 1 })));
        expect(await pending).to.be.instanceOf(Job);
      });
    });

    describe("under useTransactionalTests({ runAfterCommit: false })", () => {
      let kept: Promise<Job | undefined> | undefined;
      useTransactionalTests({ registry: reg, runAfterCommit: false });
      afterEach(async () => {
        // The test's rollback has settled whatever the test left pending.
        if (kept !== undefined) expect(await within(kept, 5_000)).to.equal(undefined);
        kept = undefined;
      });
      it("drops a job outside any block at once", async () => {
        expect(await add({ n: 1 })).to.equal(undefined);
        expect(await h.jobs()).to.equal(0);
      });
      it("drops a job of a block, resolving undefined by the end of the test", async () => {
        await reg.withTransaction(() => void (kept = add({ n: 2 })));
        expect(await h.jobs()).to.equal(0);
      });
    });
  });
});

/** `promise`'s outcome, or a rejection when it has not settled within `ms`. */
async function within<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`still pending after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}
