import { expect } from "chai";
import sinon from "sinon";
import {
  createSessionRegistry,
  isRetryableError,
  PropagationError,
  RegistryClosedError,
  type Session,
  SessionClosedError,
  type SessionRegistry,
  SessionTimeoutError,
} from "../src/index.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { pgServer } from "./support/postgres-hooks.js";
import { SQLITE_DRIVER } from "./support/sqlite.js";
import { deferred, recordEvents, rejectionOf } from "./support/util.js";

class Boom extends Error {}

/** An error shaped like a PostgreSQL serialization failure, as TypeORM wraps it. */
function serializationFailure(): Error {
  return Object.assign(new Error("could not serialize access due to concurrent update"), {
    driverError: { code: "40001" },
  });
}

const never = new Promise<never>(() => undefined);

forEachBackend("lifecycle", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
  });
  afterEach(() => db.dispose());

  const bodies = async () =>
    (await reg.withSession((s) => s.getRepository(Note).find({ order: { id: "ASC" } }))).map((n) => n.body);

  describe("timeoutMs", () => {
    it("rejects with SessionTimeoutError, rolls back, releases, aborts the signal; the abandoned body is refused", async () => {
      const { log } = recordEvents(reg, ["timeout", "rollback", "close"]);
      const later = deferred();
      let lateOutcome!: Promise<unknown>;
      let session!: Session;
      const error = await rejectionOf(
        reg.withTransaction(
          async (s) => {
            session = s;
            await s.getRepository(Note).insert({ body: "abandoned", block: 1 });
            lateOutcome = (async () => {
              await later.promise;
              return s.getRepository(Note).insert({ body: "too late", block: 2 });
            })().catch((e: unknown) => e);
            await never;
          },
          { timeoutMs: 100, name: "slow" },
        ),
      );
      expect(error).to.be.instanceOf(SessionTimeoutError);
      expect(error).to.have.property("code", "ERR_SESSION_TIMEOUT");
      expect(error).to.have.property("timeoutMs", 100);
      expect((error as Error).message).to.match(/session #\d+ \(slow\) exceeded its timeoutMs of 100 ms/);
      expect(log.map((l) => l.split("#")[0])).to.deep.equal(["timeout", "rollback", "close"]);
      expect(session.signal.aborted).to.equal(true);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      later.resolve();
      expect(await lateOutcome).to.be.instanceOf(SessionClosedError);
      expect(await bodies()).to.deep.equal([]);
      expect(reg.stats()).to.include({ timeouts: 1, active: 0 });
    });

    it("bounds the wait for a connection", async () => {
      const holding = deferred();
      const release = deferred();
      // Hold every connection there is: SQLite's one, or the pool's five.
      const holders = Array.from({ length: backend.kind === "sqlite" ? 1 : 5 }, () =>
        reg.withTransaction(async (s) => {
          await s.query("SELECT 1");
          holding.resolve();
          await release.promise;
        }),
      );
      await holding.promise;
      await new Promise<void>((r) => setImmediate(r));
      const error = await rejectionOf(reg.withTransaction((s) => s.query("SELECT 1"), { timeoutMs: 100 }));
      expect(error).to.be.instanceOf(SessionTimeoutError);
      // A pool still owes the abandoned session a connection: it counts as open until
      // that connection, handed over late, is given straight back.
      const owed = backend.kind === "postgres" ? 1 : 0;
      expect(reg.stats().active).to.equal(holders.length + owed);
      release.resolve();
      await Promise.all(holders);
      expect(await reg.drain({ timeoutMs: 10_000 })).to.include({ forced: 0 });
      expect(reg.stats().active).to.equal(0);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    });

    if (backend.kind === "postgres") {
      /**
       * Record statements sent to a connection while another is unanswered: node-postgres
       * queues them today and will refuse them in pg@9.
       */
      const recordOverlaps = async (): Promise<string[]> => {
        await reg.withSession(() => undefined); // initialized
        const runner = Object.getPrototypeOf(reg.dataSource!.driver.createQueryRunner("master")) as {
          query: (...args: unknown[]) => Promise<unknown>;
        };
        const overlapping: string[] = [];
        const unanswered = new WeakMap<object, number>();
        const query = runner.query;
        sinon.replace(runner, "query", async function (this: object, ...args: unknown[]) {
          const pending = unanswered.get(this) ?? 0;
          if (pending > 0) overlapping.push(String(args[0]));
          unanswered.set(this, pending + 1);
          try {
            return await query.apply(this, args);
          } finally {
            unanswered.set(this, unanswered.get(this)! - 1);
          }
        });
        return overlapping;
      };
      afterEach(() => sinon.restore());

      it("cancels the statement PostgreSQL is running for the abandoned body, and rolls back after it", async () => {
        const overlapping = await recordOverlaps();
        const started = performance.now();
        const error = await rejectionOf(reg.withTransaction((s) => s.query("SELECT pg_sleep(30)"), { timeoutMs: 200 }));
        expect(error).to.be.instanceOf(SessionTimeoutError);
        expect(performance.now() - started).to.be.below(10_000);
        const running = await pgServer()!.adminQuery(
          "SELECT count(*)::int AS n FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'",
        );
        expect(running).to.deep.equal([{ n: 0 }]);
        expect(overlapping).to.deep.equal([]);
        expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      });

      it("a session removed while a statement is in flight rolls back after the statement, not alongside it", async () => {
        const overlapping = await recordOverlaps();
        let sleeping!: Promise<unknown>;
        const error = await rejectionOf(
          reg.withTransaction(async (s) => {
            await s.getRepository(Note).insert({ body: "undone", block: 1 });
            sleeping = s.query("SELECT pg_sleep(0.2)");
            await new Promise<void>((resolve) => setImmediate(resolve)); // sent
            await reg.remove();
          }),
        );
        expect(error).to.be.instanceOf(SessionClosedError);
        expect(await sleeping).to.have.length(1); // the statement itself ran to its end
        expect(overlapping).to.deep.equal([]);
        expect(await bodies()).to.deep.equal([]);
        expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      });
    }

    it("on a block that joins its scope's session, closes that session: the unit of work has failed", async () => {
      let outer!: Session;
      const error = await rejectionOf(
        reg.withSession(async (s) => {
          outer = s;
          await reg.withTransaction(() => never, { timeoutMs: 50 });
        }),
      );
      expect(error).to.be.instanceOf(SessionTimeoutError);
      expect(outer.closed).to.equal(true);
      expect(await rejectionOf(outer.query("SELECT 1"))).to.be.instanceOf(SessionClosedError);
    });

    it("rejects an invalid value with RangeError", async () => {
      expect(await rejectionOf(reg.withSession(() => 1, { timeoutMs: 0 }))).to.be.instanceOf(RangeError);
      expect(await rejectionOf(reg.withSession(() => 1, { timeoutMs: Number.NaN }))).to.be.instanceOf(RangeError);
    });
  });

  describe("retry", () => {
    it("re-runs the body from the start in a new transaction, each attempt numbered in the events", async () => {
      const { events } = recordEvents(reg, ["begin", "commit", "rollback"]);
      const seen: string[] = [];
      let attempts = 0;
      const result = await reg.withTransaction(
        async (s) => {
          attempts += 1;
          await s.getRepository(Note).insert({ body: `attempt ${attempts}`, block: attempts });
          s.afterCommit(() => seen.push(`afterCommit of attempt ${attempts}`));
          s.afterRollback(() => seen.push(`afterRollback of attempt ${attempts}`));
          if (attempts < 3) throw serializationFailure();
          return attempts;
        },
        { retry: { retries: 3, baseDelayMs: 1 } },
      );
      expect(result).to.equal(3);
      expect(events.map((e) => `${e.event}:${e.attempt}`)).to.deep.equal([
        "begin:1",
        "rollback:1",
        "begin:2",
        "rollback:2",
        "begin:3",
        "commit:3",
      ]);
      expect(seen, "callbacks of failed attempts are discarded").to.deep.equal(["afterCommit of attempt 3"]);
      expect(await bodies()).to.deep.equal(["attempt 3"]);
    });

    it("gives up after `retries` extra attempts with the last error; other errors are not retried", async () => {
      let attempts = 0;
      const error = await rejectionOf(
        reg.withTransaction(
          () => {
            attempts += 1;
            throw serializationFailure();
          },
          { retry: 2 },
        ),
      );
      expect(isRetryableError(error)).to.equal(true);
      expect(attempts).to.equal(3);
      attempts = 0;
      await rejectionOf(
        reg.withTransaction(
          () => {
            attempts += 1;
            throw new Boom("not retryable");
          },
          { retry: 5 },
        ),
      );
      expect(attempts).to.equal(1);
    });

    it("retryOn replaces the built-in test", async () => {
      let attempts = 0;
      await reg.withTransaction(
        () => {
          attempts += 1;
          if (attempts === 1) throw new Boom("conflict");
        },
        { retry: { retries: 1, baseDelayMs: 1, retryOn: (e) => e instanceof Boom } },
      );
      expect(attempts).to.equal(2);
    });

    it("retryOn is asked once per failed attempt, in a new scope and in a joined one", async () => {
      for (const joined of [false, true]) {
        const asked: number[] = [];
        const conflict = new Boom("conflict");
        let attempts = 0;
        const block = (): Promise<void> =>
          reg.withTransaction(
            () => {
              attempts += 1;
              if (attempts < 3) throw conflict; // the same object each time: asked again all the same
            },
            {
              retry: {
                retries: 3,
                baseDelayMs: 1,
                retryOn: (e) => {
                  asked.push(attempts);
                  return e instanceof Boom;
                },
              },
            },
          );
        await (joined ? reg.withSession(() => block()) : block());
        expect(attempts, joined ? "joined" : "new scope").to.equal(3);
        expect(asked, joined ? "joined" : "new scope").to.deep.equal([1, 2]);
      }
    });

    it("only the outermost transactional block retries", async () => {
      let inner = 0;
      const error = await rejectionOf(
        reg.withTransaction(async () => {
          await reg.withTransaction(
            () => {
              inner += 1;
              throw serializationFailure();
            },
            { retry: 3 },
          );
        }),
      );
      expect(isRetryableError(error)).to.equal(true);
      expect(inner).to.equal(1);
    });

    it("needs a transaction", async () => {
      const error = await rejectionOf(reg.withSession(() => 1, { retry: 2 }));
      expect(error).to.be.instanceOf(TypeError);
      expect((error as Error).message).to.match(/`retry`.*transaction/);
    });

    if (backend.kind === "sqlite") {
      it("retries a real SQLITE_BUSY from another connection holding the write lock", async () => {
        await reg.withSession(() => undefined); // create the tables first
        const other = db.dataSource();
        await other.initialize();
        const locker = other.createQueryRunner();
        await locker.query("BEGIN IMMEDIATE");
        // The first attempt's BEGIN IMMEDIATE waits this long for the lock, then fails with SQLITE_BUSY.
        const waitMs = 50;
        const timeout = SQLITE_DRIVER === "sqlite" ? { busyTimeout: waitMs } : { timeout: waitMs };
        const busy = createSessionRegistry({ name: "busy", dataSource: db.dataSource(timeout) });
        let attempts = 0;
        busy.on("open", () => (attempts += 1)); // each attempt is a session of its own
        const reported: unknown[] = [];
        busy.on("error", ({ error }) => reported.push(error));
        const failures: unknown[] = [];
        await busy.withTransaction((s) => s.getRepository(Note).insert({ body: "after the lock", block: 1 }), {
          retry: {
            retries: 5,
            baseDelayMs: 5,
            retryOn: (error) => {
              if (failures.length === 0) void locker.query("COMMIT");
              failures.push(error);
              return isRetryableError(error);
            },
          },
        });
        expect(attempts).to.be.greaterThan(1);
        expect(failures.length).to.be.greaterThan(0);
        expect(failures.every(isRetryableError), String(failures[0])).to.equal(true);
        expect(reported, "a BEGIN that failed leaves nothing to roll back, and nothing to report").to.deep.equal([]);
        expect(await bodies()).to.deep.equal(["after the lock"]);
      });
    }
  });

  describe("drain", () => {
    it("refuses new sessions, waits for open ones, and reports them as waited", async () => {
      const release = deferred();
      const opened = deferred();
      reg.on("open", () => opened.resolve());
      const running = reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "finishes", block: 1 });
        await release.promise;
        // Joining blocks of an open session still work while the registry drains.
        await reg.withTransaction((t) => t.getRepository(Note).insert({ body: "joined", block: 2 }));
      });
      await opened.promise;
      const draining = reg.drain();
      expect(await rejectionOf(reg.withSession(() => 1))).to.be.instanceOf(RegistryClosedError);
      release.resolve();
      await running;
      expect(await draining).to.deep.equal({ waited: 1, forced: 0 });
      reg.configure({ dataSource: db.dataSource() }); // opens it again
      expect(await bodies()).to.deep.equal(["finishes", "joined"]);
    });

    it("force-closes what is left after timeoutMs: rolled back, released, the block rejects with SessionClosedError", async () => {
      const opened = deferred();
      reg.on("open", () => opened.resolve());
      const stuck = reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "stuck", block: 1 });
        await never;
      });
      const idle = reg.withSession(() => never);
      const outcomes = Promise.allSettled([stuck, idle]);
      await opened.promise;
      const ds = reg.dataSource!;
      expect(await reg.drain({ timeoutMs: 50, destroy: true })).to.deep.equal({ waited: 0, forced: 2 });
      expect(ds.isInitialized).to.equal(false);
      for (const outcome of await outcomes) {
        expect(outcome.status === "rejected" && outcome.reason).to.be.instanceOf(SessionClosedError);
      }
      reg.configure({ dataSource: db.dataSource() });
      expect(await bodies()).to.deep.equal([]);
    });
  });

  describe("leakDetectionMs", () => {
    it("reports a session open too long once, with its name and the stack that opened it", async () => {
      const leaky = createSessionRegistry({ name: "leaky", dataSource: db.dataSource(), leakDetectionMs: 30 });
      const leaked = deferred<{ name?: string; stack?: string }>();
      const { log, events } = recordEvents(leaky, ["leak", "close"]);
      leaky.on("leak", (e) => leaked.resolve(e));
      await leaky.withSession(() => undefined); // initialized, quickly: no report
      const release = deferred();
      const block = leaky.withSession(() => release.promise, { name: "forgotten" });
      const event = await leaked.promise;
      expect(event.name).to.equal("forgotten");
      expect(event.stack).to.match(/opened here[\s\S]*lifecycle\.spec/);
      release.resolve();
      await block;
      expect(log.map((l) => l.split("#")[0])).to.deep.equal(["close", "leak", "close"]);
      expect(events[0]!.leakReported).to.equal(undefined);
      expect(events[2]!.leakReported).to.equal(true);
      expect(leaky.stats()).to.include({ leaks: 1 });
      await leaky.withSession(() => undefined); // quick: no report
      expect(leaky.stats()).to.include({ leaks: 1 });
    });

    it("rejects an invalid value with RangeError", () => {
      expect(() => createSessionRegistry({ leakDetectionMs: -1 })).to.throw(RangeError, /leakDetectionMs/);
    });
  });

  describe("detached()", () => {
    it("runs in a fresh scope with its own session, and outlives the caller's block", async () => {
      const done = deferred<{ own: Session; current: Session }>();
      let caller!: Session;
      const gate = deferred();
      await reg.withSession(async (s) => {
        caller = s;
        void reg.detached(async (d) => {
          await gate.promise; // the caller's block has ended by then
          await d.getRepository(Note).insert({ body: "detached", block: 1 });
          done.resolve({ own: d, current: reg.current() });
        });
      });
      expect(caller.closed).to.equal(true);
      gate.resolve();
      const { own, current } = await done.promise;
      expect(own).not.to.equal(caller);
      expect(current).to.equal(own);
      expect(await bodies()).to.deep.equal(["detached"]);
    });

    if (backend.kind === "sqlite") {
      it("inside an open transaction on SQLite rejects with PropagationError at once", async () => {
        await reg.withTransaction(async (s) => {
          await s.query("SELECT 1");
          expect(await rejectionOf(reg.detached(() => 1))).to.be.instanceOf(PropagationError);
        });
      });
    } else {
      it("inside an open transaction on PostgreSQL runs on a connection of its own", async () => {
        await reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: "outer, uncommitted", block: 1 });
          const seen = await reg.detached((d) => d.getRepository(Note).count());
          expect(seen).to.equal(0);
        });
      });
    }
  });
});
