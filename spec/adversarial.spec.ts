import { expect } from "chai";
import { EventEmitter } from "node:events";
import type { EntitySubscriberInterface } from "typeorm";
import {
  createSessionRegistry,
  currentSession,
  PropagationError,
  type Session,
  SessionClosedError,
  type SessionRegistry,
  tryCurrentSession,
  withSession,
  withTransaction,
} from "../src/index.js";
import { Account, Note } from "./support/entities.js";
import { TempSqlite } from "./support/sqlite.js";
import { deferred, load, recordEvents, rejectionOf, seeded, turns } from "./support/util.js";

class Planned extends Error {}

/**
 * Safety bound, not synchronization: resolves to the settled outcome of `promise`,
 * or to "pending" when it has not settled after `ms` (a wait that would otherwise
 * hang the test, e.g. late work that joined a closing transaction).
 */
async function outcomeWithin(
  promise: Promise<unknown>,
  ms = 3000,
): Promise<{ status: "fulfilled"; value: unknown } | { status: "rejected"; reason: unknown } | { status: "pending" }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<{ status: "pending" }>((resolve) => {
    timer = setTimeout(() => resolve({ status: "pending" }), ms);
  });
  try {
    return await Promise.race([
      promise.then(
        (value) => ({ status: "fulfilled" as const, value }),
        (reason: unknown) => ({ status: "rejected" as const, reason }),
      ),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** What a synchronous call threw (or "returned"). */
function syncOutcome(fn: () => unknown): unknown {
  try {
    fn();
    return "returned";
  } catch (error) {
    return error;
  }
}

/** Class name + code of an outcome, for compact deep-equal assertions. */
function kind(outcome: unknown): string {
  if (typeof outcome === "string") return outcome;
  if (outcome && typeof outcome === "object" && "status" in outcome) {
    const o = outcome as { status: string; reason?: unknown };
    if (o.status !== "rejected") return o.status;
    return kind(o.reason);
  }
  if (outcome instanceof Error) return outcome.constructor.name;
  return String(outcome);
}

/** Whether a transaction is open on the single shared SQLite connection. */
function sharedConnectionInTransaction(reg: SessionRegistry): boolean {
  return reg.dataSource!.driver.createQueryRunner("master").isTransactionActive;
}

describe("adversarial (SQLite core)", () => {
  let db: TempSqlite;
  let reg: SessionRegistry;
  beforeEach(() => {
    db = new TempSqlite();
    reg = db.registry();
  });
  afterEach(() => db.dispose());

  const notes = (r: SessionRegistry = reg) =>
    r.withSession(async (s) => (await s.getRepository(Note).find({ order: { id: "ASC" } })).map((n) => n.body));

  /** A registry whose DataSource carries `subscriber`. */
  async function registryWithSubscriber(subscriber: EntitySubscriberInterface): Promise<SessionRegistry> {
    const ds = db.dataSource();
    await ds.initialize();
    ds.subscribers.push(subscriber);
    return createSessionRegistry({ name: "subscribed", dataSource: ds });
  }

  // ---------------------------------------------------------------------------
  describe("guarantee 4: scope isolation", () => {
    it("40 concurrent blocks see only their own session across await, timers, setImmediate, nextTick, queueMicrotask and EventEmitter callbacks", async () => {
      const random = seeded(4);
      const hops: ((s: Session) => Promise<boolean>)[] = [
        async (s) => {
          await Promise.resolve();
          return reg.current() === s;
        },
        (s) => new Promise((resolve) => setTimeout(() => resolve(reg.current() === s), Math.floor(random() * 3))),
        (s) => new Promise((resolve) => setImmediate(() => resolve(reg.current() === s))),
        (s) => new Promise((resolve) => process.nextTick(() => resolve(reg.current() === s))),
        (s) => new Promise((resolve) => queueMicrotask(() => resolve(reg.current() === s))),
        (s) =>
          new Promise((resolve) => {
            const ee = new EventEmitter();
            ee.once("go", () => resolve(reg.current() === s && tryCurrentSession(reg) === s));
            setImmediate(() => ee.emit("go"));
          }),
        async (s) => {
          await s.query("SELECT 1");
          return reg.current() === s;
        },
        async (s) => {
          // the scoped proxies resolve to this block's session too
          const n = await reg.getRepository(Note).countBy({ block: s.id });
          return n >= 0 && reg.current() === s;
        },
      ];
      const plans = Array.from({ length: 40 }, () =>
        Array.from({ length: 8 }, () => Math.floor(random() * hops.length)),
      );
      const results = await Promise.all(
        plans.map((plan, i) =>
          reg.withSession(
            async (s) => {
              const seen: boolean[] = [];
              for (const h of plan) seen.push(await hops[h]!(s));
              return seen.every(Boolean);
            },
            { transaction: i % 2 === 0 },
          ),
        ),
      );
      expect(results.every(Boolean)).to.equal(true);
      expect(reg.stats()).to.include({ active: 0, opened: 40, closed: 40 });
    });

    it("requiresNew siblings under Promise.all inside a parent withSession: own sessions, serialized, atomic; parent untouched", async () => {
      const { log } = recordEvents(reg, ["connect"]);
      const random = seeded(44);
      let parent!: Session;
      const outcomes = await reg.withSession(async (p) => {
        parent = p;
        const settled = await Promise.allSettled(
          Array.from({ length: 12 }, (_, i) =>
            reg.withTransaction(
              async (s) => {
                expect(s).not.to.equal(p);
                const repo = reg.getRepository(Note); // proxy: must resolve to s
                await repo.insert({ body: `first ${i}`, block: i });
                if (random() < 0.5) await turns(1);
                await new Promise<void>((r) => setTimeout(r, 0));
                expect(reg.current()).to.equal(s);
                await repo.insert({ body: `second ${i}`, block: i });
                // its own rows, and no half of anybody else's (uncommitted rows would make it odd)
                expect(await s.getRepository(Note).countBy({ block: i })).to.equal(2);
                expect((await s.getRepository(Note).count()) % 2).to.equal(0);
                if (i % 3 === 0) throw new Planned(`child ${i}`);
                return i;
              },
              { propagation: "requiresNew", name: `child-${i}` },
            ),
          ),
        );
        expect(reg.current()).to.equal(p);
        return settled;
      });
      expect(outcomes.map((o) => o.status)).to.deep.equal(
        Array.from({ length: 12 }, (_, i) => (i % 3 === 0 ? "rejected" : "fulfilled")),
      );
      const bodies = await notes();
      expect(bodies.length).to.equal(16);
      for (let i = 0; i < 12; i++) {
        expect(bodies.filter((b) => b.endsWith(` ${i}`)).length, `rows of child ${i}`).to.equal(i % 3 === 0 ? 0 : 2);
      }
      // the parent never touched the database
      expect(log.filter((l) => l === `connect#${parent.id}`)).to.deep.equal([]);
      expect(reg.stats()).to.include({ active: 0 });
    });

    it("nested registries on two database files: each sees its own session; transactions are independent", async () => {
      const other = new TempSqlite();
      try {
        const regB = other.registry("b");
        await reg.withTransaction(async (a) => {
          await a.getRepository(Note).insert({ body: "A1", block: 1 });
          await regB.withTransaction(async (b) => {
            expect(reg.current()).to.equal(a);
            expect(regB.current()).to.equal(b);
            await b.getRepository(Note).insert({ body: "B1", block: 1 });
            // A nested again inside B joins A's scope (a savepoint of A's transaction)
            const err = await rejectionOf(
              reg.withTransaction(async (a2) => {
                expect(a2).to.equal(a);
                await a2.getRepository(Note).insert({ body: "A-undone", block: 2 });
                throw new Planned("inner A");
              }),
            );
            expect(err).to.be.instanceOf(Planned);
            // a second session of B's database while A's transaction is open is fine: different connection
            // B itself is in a transaction here, so a requiresNew on B is refused
            expect(
              await rejectionOf(regB.withSession((b2) => b2.query("SELECT 1"), { propagation: "requiresNew" })),
            ).to.be.instanceOf(PropagationError);
          });
          // requiresNew on B while A (another database) holds a transaction: allowed
          await regB.withTransaction(async (b) => b.getRepository(Note).insert({ body: "B2", block: 2 }), {
            propagation: "requiresNew",
          });
          const err = await rejectionOf(
            regB.withTransaction(async (b) => {
              await b.getRepository(Note).insert({ body: "B-undone", block: 3 });
              throw new Planned("B fails");
            }),
          );
          expect(err).to.be.instanceOf(Planned);
          expect(() => regB.current()).to.throw(/outside a session scope of registry "b"/);
        });
        expect(await notes(reg)).to.deep.equal(["A1"]);
        expect(await notes(regB)).to.deep.equal(["B1", "B2"]);

        // interleaved: 200 blocks nesting B in A (one lock order: A then B; the inverse order in
        // other blocks would be a user-made cross-database deadlock), plus B-only blocks between them
        const random = seeded(2);
        const [outer, inner] = [reg, regB];
        const standalone = Array.from({ length: 50 }, (_, i) =>
          regB.withSession(async (b) => {
            await b.query("INSERT INTO notes (body, block) VALUES (?, ?)", [`s${i}`, 100]);
            expect(regB.current()).to.equal(b);
            expect(reg.tryCurrent()).to.equal(undefined);
          }),
        );
        await Promise.all([
          ...standalone,
          ...Array.from({ length: 200 }, (_, i) => {
            return outer
              .withTransaction(async (o) => {
                await o.query("INSERT INTO notes (body, block) VALUES (?, ?)", [`o${i}`, 100 + i]);
                if (random() < 0.5) await turns(1);
                await inner.withTransaction(async (n) => {
                  expect(outer.current()).to.equal(o);
                  expect(inner.current()).to.equal(n);
                  await n.query("INSERT INTO notes (body, block) VALUES (?, ?)", [`n${i}`, 100 + i]);
                  if (random() < 0.5) await turns(1);
                  expect(outer.current()).to.equal(o);
                });
                if (i % 4 === 3) throw new Planned(`outer ${i}`);
              })
              .catch((e: unknown) => {
                if (!(e instanceof Planned)) throw e;
              });
          }),
        ]);
        const a = await reg.withSession((s) =>
          s.query<{ body: string }[]>("SELECT body FROM notes WHERE block >= 100"),
        );
        const b = await regB.withSession((s) =>
          s.query<{ body: string }[]>("SELECT body FROM notes WHERE block >= 100"),
        );
        // i%4==3 rolls back A's outer row; its committed inner row on B stays.
        const expectA = Array.from({ length: 200 }, (_, i) => `o${i}`)
          .filter((_, i) => i % 4 !== 3)
          .sort();
        const expectB = [
          ...Array.from({ length: 200 }, (_, i) => `n${i}`),
          ...Array.from({ length: 50 }, (_, i) => `s${i}`),
        ].sort();
        expect(a.map((r) => r.body).sort()).to.deep.equal(expectA);
        expect(b.map((r) => r.body).sort()).to.deep.equal(expectB);
        expect(reg.stats().active).to.equal(0);
        expect(regB.stats().active).to.equal(0);
      } finally {
        await other.dispose();
      }
    });
  });

  // ---------------------------------------------------------------------------
  describe("guarantee 9: closing and closed sessions", () => {
    type LateOps = Record<string, unknown>;

    /** Everything a late continuation might try, from the context it runs in. */
    async function tryEverything(r: SessionRegistry, s: Session): Promise<LateOps> {
      const out: LateOps = {};
      out.closed = s.closed;
      out.current = kind(syncOutcome(() => r.current()));
      out.tryCurrent = kind(syncOutcome(() => r.tryCurrent()));
      out.currentSession = kind(syncOutcome(() => currentSession(r)));
      out.afterCommit = kind(syncOutcome(() => s.afterCommit(() => undefined)));
      const ops: Record<string, () => Promise<unknown>> = {
        query: () => s.query("INSERT INTO notes (body, block) VALUES ('late', 99)"),
        managerInsert: () => s.manager.insert(Note, { body: "late", block: 99 }),
        managerFind: () => s.manager.find(Note),
        repoSave: () => s.getRepository(Note).save({ body: "late", block: 99 }),
        queryBuilder: () => s.manager.createQueryBuilder(Note, "n").getMany(),
        begin: () => s.begin(),
        managerTransaction: () => s.manager.transaction((m) => m.insert(Note, { body: "late", block: 99 })),
        proxyManager: () => r.manager.insert(Note, { body: "late", block: 99 }),
        proxyRepo: () => r.getRepository(Note).insert({ body: "late", block: 99 }),
        proxyRepoCount: () => r.getRepository(Note).count(),
        joinSession: () => r.withSession((j) => j.query("INSERT INTO notes (body, block) VALUES ('late', 99)")),
        joinTransaction: () => r.withTransaction((j) => j.query("INSERT INTO notes (body, block) VALUES ('late', 99)")),
        joinMandatory: () => r.withSession((j) => j.query("SELECT 1"), { propagation: "mandatory" }),
      };
      for (const [name, op] of Object.entries(ops)) {
        let promise: Promise<unknown>;
        try {
          promise = op();
        } catch (error) {
          out[name] = `threw synchronously: ${kind(error)}`;
          continue;
        }
        out[name] = kind(await outcomeWithin(promise));
      }
      return out;
    }

    const EXPECTED: LateOps = {
      closed: true,
      current: "SessionClosedError",
      tryCurrent: "SessionClosedError",
      currentSession: "SessionClosedError",
      afterCommit: "SessionClosedError",
      query: "SessionClosedError",
      managerInsert: "SessionClosedError",
      managerFind: "SessionClosedError",
      repoSave: "SessionClosedError",
      queryBuilder: "SessionClosedError",
      begin: "SessionClosedError",
      managerTransaction: "SessionClosedError",
      proxyManager: "SessionClosedError",
      proxyRepo: "SessionClosedError",
      proxyRepoCount: "SessionClosedError",
      joinSession: "SessionClosedError",
      joinTransaction: "SessionClosedError",
      joinMandatory: "SessionClosedError",
    };

    it("during the outermost COMMIT (held open by a beforeTransactionCommit subscriber), late work gets SessionClosedError everywhere and joins nothing", async () => {
      const gate = deferred();
      const lateDone = deferred<LateOps>();
      let armed = false;
      const r = await registryWithSubscriber({
        async beforeTransactionCommit() {
          if (!armed) return;
          armed = false;
          gate.resolve();
          await outcomeWithin(lateDone.promise, 10_000);
        },
      });
      await r.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "in tx", block: 1 });
        void (async () => {
          await gate.promise; // resumes in the block's own context, while the COMMIT is in flight
          lateDone.resolve(await tryEverything(r, s));
        })();
        armed = true;
      });
      expect(await lateDone.promise).to.deep.equal(EXPECTED);
      expect(await notes(r)).to.deep.equal(["in tx"]);
      expect(sharedConnectionInTransaction(r)).to.equal(false);
      expect(r.stats()).to.include({ active: 0 });
    });

    it("after the block settled, late promise continuations get SessionClosedError everywhere", async () => {
      const gate = deferred();
      let late!: Promise<LateOps>;
      let session!: Session;
      await reg.withTransaction(async (s) => {
        session = s;
        await s.query("SELECT 1");
        late = gate.promise.then(() => tryEverything(reg, s));
      });
      gate.resolve();
      expect(await late).to.deep.equal(EXPECTED);
      expect(session.signal.aborted).to.equal(true);
      expect(await notes()).to.deep.equal([]);
    });

    it("after the block settled, late timer / setImmediate / nextTick / queueMicrotask / EventEmitter callbacks: current() and tryCurrent() throw SessionClosedError", async () => {
      const gate = deferred();
      const results: Promise<string[]>[] = [];
      await reg.withSession(async (s) => {
        await s.query("SELECT 1");
        const ee = new EventEmitter();
        const check = () => [kind(syncOutcome(() => reg.current())), kind(syncOutcome(() => reg.tryCurrent()))];
        const viaCallback = (schedule: (cb: () => void) => void) =>
          gate.promise.then(() => new Promise<string[]>((resolve) => schedule(() => resolve(check()))));
        results.push(
          viaCallback((cb) => setTimeout(cb, 0)),
          viaCallback((cb) => setImmediate(cb)),
          viaCallback((cb) => process.nextTick(cb)),
          viaCallback((cb) => queueMicrotask(cb)),
          viaCallback((cb) => {
            ee.once("x", cb);
            ee.emit("x");
          }),
        );
      });
      gate.resolve();
      for (const r of await Promise.all(results)) expect(r).to.deep.equal(["SessionClosedError", "SessionClosedError"]);
    });

    it("a scope() that never created a session: late current()/tryCurrent()/proxies/joins get SessionClosedError, no session opened", async () => {
      const gate = deferred();
      let late!: Promise<LateOps>;
      await reg.scope(() => {
        late = gate.promise.then(async () => ({
          current: kind(syncOutcome(() => reg.current())),
          tryCurrent: kind(syncOutcome(() => reg.tryCurrent())),
          proxy: kind(await outcomeWithin(reg.getRepository(Note).count())),
          join: kind(await outcomeWithin(reg.withSession((s) => s.query("SELECT 1")))),
        }));
      });
      gate.resolve();
      expect(await late).to.deep.equal({
        current: "SessionClosedError",
        tryCurrent: "SessionClosedError",
        proxy: "SessionClosedError",
        join: "SessionClosedError",
      });
      expect(reg.stats()).to.include({ opened: 0, active: 0 });
    });

    it("late work queued behind a sibling transaction of the same session is refused when the session closes, never run", async () => {
      // outer block owns the session; a joined transactional sibling holds a level; a non-awaited
      // statement from the outer frame waits for it; the outer body returns meanwhile.
      let late!: Promise<unknown>;
      const inTx = deferred();
      const release = deferred();
      const sibling = reg.withSession(async (s) => {
        const t = reg.withTransaction(async (tt) => {
          await tt.query("INSERT INTO notes (body, block) VALUES ('sibling', 1)");
          inTx.resolve();
          await release.promise;
        });
        await inTx.promise;
        late = s.query("INSERT INTO notes (body, block) VALUES ('late', 2)");
        release.resolve();
        await t;
      });
      await sibling;
      // The late statement was issued while the session was open: it may have run in autocommit
      // after the sibling committed, but must have settled by now, not be left hanging.
      const outcome = await outcomeWithin(late);
      expect(outcome.status).not.to.equal("pending");
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
    });
  });

  // ---------------------------------------------------------------------------
  describe("registry.remove()", () => {
    it("mid-withTransaction: rolls back, the block rejects with SessionClosedError, afterRollback runs once, nothing committed", async () => {
      const { log } = recordEvents(reg, ["open", "close", "rollback", "commit"]);
      let rolledBack = 0;
      let committed = 0;
      const err = await rejectionOf(
        reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: "doomed", block: 1 });
          s.afterRollback(() => void rolledBack++);
          s.afterCommit(() => void committed++);
          await reg.remove();
          expect(s.closed).to.equal(true);
          expect(kind(await outcomeWithin(s.query("SELECT 1")))).to.equal("SessionClosedError");
          await reg.remove(); // idempotent
          return "body finished";
        }),
      );
      expect(err).to.be.instanceOf(SessionClosedError);
      expect({ rolledBack, committed }).to.deep.equal({ rolledBack: 1, committed: 0 });
      expect(log.filter((l) => l.startsWith("close"))).to.have.length(1);
      expect(log.filter((l) => l.startsWith("commit"))).to.have.length(0);
      expect(await notes()).to.deep.equal([]);
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
      expect(reg.stats()).to.include({ active: 0 });
    });

    it("mid-withSession: the next current() gets a fresh session, which the block still removes before settling", async () => {
      const { log } = recordEvents(reg, ["open", "close"]);
      let first!: Session;
      let second!: Session;
      const err = await rejectionOf(
        reg.withSession(async (s) => {
          first = s;
          await s.begin();
          await s.query("INSERT INTO notes (body, block) VALUES ('undone', 1)");
          await reg.remove();
          second = reg.current();
          expect(second).not.to.equal(first);
          await second.query("INSERT INTO notes (body, block) VALUES ('autocommit', 2)");
          throw new Planned("after remove");
        }),
      );
      expect(err).to.be.instanceOf(Planned);
      expect(first.closed && second.closed).to.equal(true);
      expect(log).to.deep.equal([`open#${first.id}`, `close#${first.id}`, `open#${second.id}`, `close#${second.id}`]);
      expect(await notes()).to.deep.equal(["autocommit"]);
    });

    it("called by a late continuation after the block ended: idempotent, afterRollback callbacks are not run again", async () => {
      // Regression (fixed): remove() after the block has ended calls session._close() again, which returns the
      // cached afterRollback callbacks of the first close, and runs them a second time.
      let rolledBack = 0;
      const gate = deferred();
      let late!: Promise<void>;
      await reg.withSession(async (s) => {
        await s.begin(); // left open: rolled back when the session closes
        await s.query("INSERT INTO notes (body, block) VALUES ('left open', 1)");
        s.afterRollback(() => void rolledBack++);
        late = gate.promise.then(() => reg.remove());
      });
      expect(rolledBack).to.equal(1);
      gate.resolve();
      await late;
      expect(rolledBack, "afterRollback callbacks ran again").to.equal(1);
    });

    it("called concurrently with the block's own close: afterRollback callbacks run once", async () => {
      // Regression (fixed; same cause as above): a remove() racing the block's close reuses the same close promise
      // and runs its afterRollback callbacks a second time.
      let rolledBack = 0;
      let late!: Promise<void>;
      await reg.withSession(async (s) => {
        await s.begin();
        s.afterRollback(() => void rolledBack++);
        // runs during the block's close (when the signal aborts), in the block's own context
        late = new Promise<void>((resolve) => s.signal.addEventListener("abort", () => resolve())).then(() =>
          reg.remove(),
        );
      });
      await late;
      expect(rolledBack).to.equal(1);
    });
  });

  // ---------------------------------------------------------------------------
  describe("manual begin()/commit() inside blocks", () => {
    it("begin() left open inside withTransaction: its work is undone, the rest committed, its afterRollback runs once, no transaction left", async () => {
      const seen: string[] = [];
      const { log } = recordEvents(reg, ["begin", "commit", "rollback"]);
      const value = await reg.withTransaction(async (s) => {
        await s.query("INSERT INTO notes (body, block) VALUES ('kept', 1)");
        s.afterCommit(() => seen.push("outer afterCommit"));
        await s.begin();
        await s.query("INSERT INTO notes (body, block) VALUES ('left open', 2)");
        s.afterCommit(() => seen.push("left-open afterCommit"));
        s.afterRollback(() => seen.push("left-open afterRollback"));
        return "ok";
      });
      expect(value).to.equal("ok");
      expect(await notes()).to.deep.equal(["kept"]);
      expect(seen).to.deep.equal(["left-open afterRollback", "outer afterCommit"]);
      expect(log.map((l) => l.split("#")[0] + (l.endsWith(":sp") ? ":sp" : ""))).to.deep.equal([
        "begin",
        "begin:sp",
        "rollback:sp",
        "commit",
      ]);
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
    });

    it("begin() left open inside a joined withTransaction of a withSession: undone when the inner block ends; the session stays usable", async () => {
      await reg.withSession(async (s) => {
        await reg.withTransaction(async (t) => {
          expect(t).to.equal(s);
          await t.query("INSERT INTO notes (body, block) VALUES ('inner kept', 1)");
          await t.begin();
          await t.query("INSERT INTO notes (body, block) VALUES ('inner left open', 2)");
        });
        expect(s.inTransaction).to.equal(false);
        await s.query("INSERT INTO notes (body, block) VALUES ('after', 3)");
      });
      expect(await notes()).to.deep.equal(["inner kept", "after"]);
    });
  });

  // ---------------------------------------------------------------------------
  describe("TypeORM APIs through session managers", () => {
    it("manager.transaction(isolation, ...) inside a withTransaction rejects with PropagationError; the outer transaction goes on and commits", async () => {
      // Regression (fixed): the PropagationError is thrown from queryRunner.startTransaction(); TypeORM's
      // EntityManager.transaction() then calls queryRunner.rollbackTransaction(), which the session
      // maps to rollback() of the innermost open level: the *enclosing block's* transaction. The
      // outer block's work is silently rolled back, its later writes run in autocommit, and the
      // block finally rejects with SessionClosedError ("rolled back when it closed").
      const seen: Record<string, unknown> = {};
      const block = await outcomeWithin(
        reg.withTransaction(async (s) => {
          await s.query("INSERT INTO notes (body, block) VALUES ('outer', 1)");
          const err = await rejectionOf(
            s.manager.transaction("SERIALIZABLE", (m) => m.insert(Note, { body: "never", block: 2 })),
          );
          seen.error = kind(err);
          seen.inTransaction = s.inTransaction;
          await s.query("INSERT INTO notes (body, block) VALUES ('outer 2', 3)");
        }),
      );
      expect({ ...seen, block: kind(block), rows: await notes() }).to.deep.equal({
        error: "PropagationError",
        inTransaction: true,
        block: "fulfilled",
        rows: ["outer", "outer 2"],
      });
    });

    it("QueryBuilder writes (with and without useTransaction) go through the session and roll back with it", async () => {
      await rejectionOf(
        reg.withTransaction(async (s) => {
          await s.manager.createQueryBuilder().insert().into(Note).values({ body: "qb", block: 1 }).execute();
          await s.manager
            .createQueryBuilder()
            .insert()
            .into(Note)
            .values({ body: "qb tx", block: 2 })
            .useTransaction(true)
            .execute();
          await s.getRepository(Note).createQueryBuilder().update().set({ block: 7 }).where("block = 1").execute();
          const rows = await reg.getRepository(Note).createQueryBuilder("n").orderBy("n.id").getMany();
          expect(rows.map((n) => n.block)).to.deep.equal([7, 2]);
          throw new Planned("undo all");
        }),
      );
      expect(await notes()).to.deep.equal([]);
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
    });

    it("two concurrent begin() calls on one session: the second becomes a savepoint (as begin() documents), both resolve", async () => {
      // Regression (fixed): #push() records the second level as a savepoint synchronously, but TypeORM's
      // transactionDepth on the shared runner is still 0 while the first BEGIN is in flight, so
      // real.startTransaction() sends a second "BEGIN TRANSACTION" and one of the two begin()s
      // rejects with SQLITE_ERROR "cannot start a transaction within a transaction". This is the root of the manager.transaction()/save() races.
      const outcome = await reg.withSession(async (s) => {
        const begins = await Promise.allSettled([s.begin(), s.begin()]);
        const result = {
          begins: begins.map((b) => (b.status === "fulfilled" ? "fulfilled" : String(b.reason))),
          inTransaction: s.inTransaction,
        };
        while (s.inTransaction) await s.rollback();
        return result;
      });
      expect(outcome).to.deep.equal({ begins: ["fulfilled", "fulfilled"], inTransaction: true });
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
    });

    it("concurrent repository.save() calls in one session: each save stays atomic on its own", async () => {
      // Regression (fixed): both saves run in the same ALS frame, so the second save sees the first save's
      // transaction as its own (view.isTransactionActive is true), runs inside it without a
      // transaction of its own, and its partial writes are committed by the first save even
      // though the second save rejected. Same root cause as the manager.transaction() test below.
      const outcomes = await reg.withSession(async (s) => {
        const repo = s.getRepository(Note);
        return Promise.allSettled([
          repo.save([
            { body: "a", block: 1 },
            { body: "b", block: 1 },
          ]),
          repo.save([
            { body: "c", block: 2 },
            { body: null as unknown as string, block: 2 }, // NOT NULL violation
          ]),
        ]);
      });
      expect(outcomes.map((o) => o.status)).to.deep.equal(["fulfilled", "rejected"]);
      expect(await notes()).to.deep.equal(["a", "b"]);
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
    });

    it("concurrent manager.transaction() calls through the registry proxy in one scope: each atomic, failures undo only their own work", async () => {
      // Regression (fixed): TypeORM's manager.transaction() begins through queryRunner.startTransaction() ->
      // session.begin(), which opens a level owned by the caller's frame. Concurrent calls from one
      // frame are indistinguishable: the second becomes a SAVEPOINT inside the first, commit()/
      // rollback() act on whichever level is on top, so a transaction that resolved can be rolled
      // back by a sibling (or a failing sibling's rows committed).
      const outcomes = await reg.scope(() =>
        Promise.allSettled(
          [0, 1, 2, 3].map((i) =>
            reg.manager.transaction(async (m) => {
              await m.insert(Note, { body: `a${i}`, block: i });
              await turns(1 + (i % 2));
              await m.insert(Note, { body: `b${i}`, block: i });
              if (i % 2 === 1) throw new Planned(`tx ${i}`);
            }),
          ),
        ),
      );
      expect(
        outcomes.map((o) =>
          o.status === "fulfilled" ? "fulfilled" : `${kind(o.reason)}: ${(o.reason as Error)?.message}`,
        ),
      ).to.deep.equal(["fulfilled", "Planned: tx 1", "fulfilled", "Planned: tx 3"]);
      for (const [i, o] of outcomes.entries()) {
        if (o.status === "rejected") expect(o.reason).to.be.instanceOf(Planned).with.property("message", `tx ${i}`);
      }
      expect((await notes()).sort()).to.deep.equal(["a0", "a2", "b0", "b2"]);
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
    });

    it("a beforeTransactionCommit subscriber that writes through event.manager in an outermost block: its write commits with the transaction", async () => {
      const r = await registryWithSubscriber({
        async beforeTransactionCommit(event) {
          const n = await event.manager.getRepository(Note).count();
          await event.manager.insert(Note, { body: `audit of ${n}`, block: 0 });
        },
      });
      await r.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "work", block: 1 });
      });
      expect(await notes(r)).to.deep.equal(["work", "audit of 1"]);
      // ...and the same in a block that rolls back: nothing of it remains
      await rejectionOf(
        r.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: "undone", block: 2 });
          throw new Planned("rollback");
        }),
      );
      expect(await notes(r)).to.deep.equal(["work", "audit of 1"]);
      expect(r.stats()).to.include({ active: 0 });
    });

    it("entity subscribers (beforeInsert/afterInsert) see the session's own manager, not another session's", async () => {
      // Regression (fixed): on SQLite the session assigns its manager to the shared driver QueryRunner only when it
      // takes the connection lease (#hold), i.e. when the statement runs. InsertQueryBuilder
      // broadcasts beforeInsert *before* that, so event.manager is the manager of whichever session
      // held the lease last (here a closed one): querying through it fails with SessionClosedError
      // naming the other session (and with an open one it would run on the wrong session).
      const seen: { event: string; same: boolean; query: string }[] = [];
      const r = await registryWithSubscriber({
        async beforeInsert(event) {
          const q = await outcomeWithin(event.manager.query("SELECT 1"));
          seen.push({ event: "beforeInsert", same: event.manager === r.current().manager, query: kind(q) });
        },
        async afterInsert(event) {
          const q = await outcomeWithin(event.manager.query("SELECT 1"));
          seen.push({ event: "afterInsert", same: event.manager === r.current().manager, query: kind(q) });
        },
      });
      await r.withSession((s) => s.query("SELECT 1")); // another session takes (and gives back) the connection
      await r.withSession((s) => s.getRepository(Note).insert({ body: "x", block: 1 }));
      expect(seen).to.deep.equal([
        { event: "beforeInsert", same: true, query: "fulfilled" },
        { event: "afterInsert", same: true, query: "fulfilled" },
      ]);
    });
  });

  // ---------------------------------------------------------------------------
  describe("guarantee 6: invalid options reject, never throw synchronously", () => {
    const cases: [string, () => Promise<unknown>, new (...a: never[]) => Error, RegExp][] = [];
    const body = async () => "never";
    const add = (what: string, call: () => Promise<unknown>, type: new (...a: never[]) => Error, message: RegExp) =>
      cases.push([what, call, type, message]);
    const bad = (opts: unknown) => () => withSession(body, { registry: undefined, ...(opts as object) });
    add("options is a string", () => withSession(body, "tx" as never), TypeError, /options.*"tx"/);
    add("transaction: 'yes'", bad({ transaction: "yes" }), TypeError, /`transaction`.*"yes"/);
    add("savepoint: 0", bad({ savepoint: 0 }), TypeError, /`savepoint`.*`0`/);
    add("readOnly: 'true'", bad({ readOnly: "true" }), TypeError, /`readOnly`.*"true"/);
    add("durable: 1", bad({ durable: 1 }), TypeError, /`durable`.*`1`/);
    add("isolation: 'serializable'", bad({ isolation: "serializable" }), RangeError, /`isolation`.*"serializable"/);
    add("isolation: 5", bad({ isolation: 5 }), RangeError, /`isolation`.*`5`/);
    add("propagation: 'nested'", bad({ propagation: "nested" }), RangeError, /`propagation`.*"nested"/);
    add("name: 3", bad({ name: 3 }), TypeError, /`name`.*`3`/);
    add("registry: {}", bad({ registry: {} }), TypeError, /`registry`/);
    add("unknown option", bad({ bogus: 1 }), TypeError, /bogus/);
    add(
      "transaction: false + isolation",
      bad({ transaction: false, isolation: "SERIALIZABLE" }),
      TypeError,
      /isolation/,
    );
    add("body is not a function", () => withTransaction(null as never), TypeError, /body.*null/);
    add("scope body is not a function", () => createSessionRegistry().scope(42 as never), TypeError, /42/);
    for (const [what, call, type, message] of cases) {
      it(`${what}: rejects with ${type.name}`, async () => {
        let promise!: Promise<unknown>;
        expect(() => (promise = call())).not.to.throw();
        const err = await rejectionOf(promise);
        expect(err).to.be.instanceOf(type);
        expect((err as Error).message).to.match(message);
      });
    }

    it("invalid options on a registry block open no session and take no connection", async () => {
      const { log } = recordEvents(reg);
      for (const opts of [{ isolation: "x" }, { propagation: 1 }, { savepoint: "no" }, { registry: 1 }]) {
        let p!: Promise<unknown>;
        expect(() => (p = reg.withTransaction(async () => 1, opts as never))).not.to.throw();
        await rejectionOf(p);
      }
      expect(log).to.deep.equal([]);
    });

    it("options whose getters throw reject with that error instead of throwing synchronously", async () => {
      const opts = {
        get transaction(): boolean {
          throw new Planned("getter");
        },
      };
      let p!: Promise<unknown>;
      expect(() => (p = reg.withSession(async () => 1, opts))).not.to.throw();
      expect(await rejectionOf(p)).to.be.instanceOf(Planned);
    });
  });

  // ---------------------------------------------------------------------------
  describe("guarantee 7: isolation/readOnly on a joined transaction", () => {
    const joinedOptions: [string, object][] = [
      ["isolation, savepoint: false", { isolation: "SERIALIZABLE", savepoint: false }],
      ["readOnly, savepoint: false", { readOnly: true, savepoint: false }],
      ["isolation, mandatory", { isolation: "SERIALIZABLE", propagation: "mandatory" }],
      ["readOnly, in a scope() whose session is in a transaction", { readOnly: true }],
    ];
    for (const [what, opts] of joinedOptions) {
      it(`${what}: PropagationError, and the outer transaction is unharmed`, async () => {
        await reg.scope(async () => {
          await reg.withTransaction(async (s) => {
            await s.query("INSERT INTO notes (body, block) VALUES ('outer', 1)");
            let ran = false;
            const err = await rejectionOf(
              reg.withTransaction(async () => {
                ran = true;
              }, opts),
            );
            expect(err).to.be.instanceOf(PropagationError);
            expect(ran).to.equal(false);
            expect(s.inTransaction).to.equal(true);
          });
        });
        expect(await notes()).to.deep.equal(["outer"]);
      });
    }
  });

  // ---------------------------------------------------------------------------
  describe("guarantee 8 and 3: failures around COMMIT/BEGIN on the shared connection", () => {
    it("a COMMIT that fails (deferred foreign key) rejects with the driver's error; nothing is left open, a waiting block proceeds", async () => {
      await reg.withSession(async (s) => {
        await s.query("PRAGMA foreign_keys = ON");
        await s.query("CREATE TABLE parent (id INTEGER PRIMARY KEY)");
        await s.query(
          "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
        );
      });
      const seen: string[] = [];
      const inTx = deferred();
      const failing = reg.withTransaction(async (s) => {
        await s.query("INSERT INTO child (id, parent_id) VALUES (1, 42)");
        await s.query("INSERT INTO notes (body, block) VALUES ('with bad child', 1)");
        s.afterCommit(() => seen.push("afterCommit"));
        s.afterRollback(() => seen.push("afterRollback"));
        inTx.resolve();
        await turns(2);
      });
      const waiter = (async () => {
        await inTx.promise;
        return reg.withTransaction(async (s) => {
          await s.query("INSERT INTO notes (body, block) VALUES ('waiter', 2)");
          return s.query<{ n: number }[]>("SELECT count(*) AS n FROM child");
        });
      })();
      const err = await rejectionOf(failing);
      expect((err as Error).message).to.match(/FOREIGN KEY/i);
      expect(seen).to.deep.equal(["afterRollback"]);
      expect(await waiter).to.deep.equal([{ n: 0 }]);
      expect(await notes()).to.deep.equal(["waiter"]);
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
      // The connection is really out of any transaction: BEGIN works.
      await reg.withSession(async (s) => {
        await s.query("BEGIN");
        await s.query("ROLLBACK");
      });
    });

    it("a readOnly transaction whose COMMIT fails does not leave the shared connection read-only", async () => {
      // Regression (fixed): readOnly on SQLite sets PRAGMA query_only = ON for the transaction and turns it off
      // in #endOutermost; a failed COMMIT (here a beforeTransactionCommit subscriber that throws)
      // goes through #discard instead, which never resets it: every later write on the DataSource
      // fails with SQLITE_READONLY ("attempt to write a readonly database").
      let fail = false;
      const r = await registryWithSubscriber({
        beforeTransactionCommit() {
          if (fail) throw new Planned("subscriber refuses the commit");
        },
      });
      fail = true;
      const err = await rejectionOf(r.withTransaction((s) => s.getRepository(Note).count(), { readOnly: true }));
      fail = false;
      expect(err).to.be.instanceOf(Planned);
      const write = await outcomeWithin(
        r.withSession((s) => s.query("INSERT INTO notes (body, block) VALUES ('w', 1)")),
      );
      expect(write.status === "rejected" ? String((write as { reason: unknown }).reason) : write.status).to.equal(
        "fulfilled",
      );
    });

    it("a beforeTransactionCommit subscriber that throws: the block rejects with its error, nothing is committed", async () => {
      let fail = false;
      const r = await registryWithSubscriber({
        beforeTransactionCommit() {
          if (fail) throw new Planned("no");
        },
      });
      fail = true;
      const err = await rejectionOf(
        r.withTransaction((s) => s.getRepository(Note).insert({ body: "never committed", block: 1 })),
      );
      fail = false;
      expect(err).to.be.instanceOf(Planned);
      expect(await notes(r)).to.deep.equal([]);
      expect(sharedConnectionInTransaction(r)).to.equal(false);
    });

    it("an isolation SQLite refuses at BEGIN (READ COMMITTED): the block rejects, the connection is released to a waiter", async () => {
      const holder = deferred();
      const first = reg.withTransaction(async (s) => {
        await s.query("SELECT 1");
        await holder.promise;
      });
      const refused = reg.withTransaction(async () => "never", { isolation: "READ COMMITTED" });
      const after = reg.withTransaction((s) => s.query("INSERT INTO notes (body, block) VALUES ('after', 1)"));
      holder.resolve();
      await first;
      expect(kind(await outcomeWithin(refused))).not.to.equal("pending");
      expect(kind(await outcomeWithin(refused))).not.to.equal("fulfilled");
      expect((await outcomeWithin(after)).status).to.equal("fulfilled");
      expect(await notes()).to.deep.equal(["after"]);
      expect(reg.stats()).to.include({ active: 0 });
    });

    for (const thrown of [undefined, null, "a string", 0, { plain: "object" }]) {
      it(`the body throws ${JSON.stringify(thrown) ?? "undefined"}: rolled back and the very same value rethrown`, async () => {
        let err: unknown = "not rejected";
        try {
          await reg.withTransaction(async (s) => {
            await s.query("INSERT INTO notes (body, block) VALUES ('x', 1)");
            // eslint-disable-next-line @typescript-eslint/only-throw-error -- deliberately not an Error
            throw thrown;
          });
        } catch (e) {
          err = e;
        }
        expect(err).to.equal(thrown);
        expect(await notes()).to.deep.equal([]);
        expect(reg.stats()).to.include({ active: 0, rollbacks: 1 });
      });
    }
  });

  // ---------------------------------------------------------------------------
  describe("guarantee 2: lazy connection", () => {
    it("create(), createQueryBuilder().getQuery(), metadata reads, signal and afterCommit take no connection", async () => {
      const { log } = recordEvents(reg, ["connect", "begin"]);
      await reg.withSession((s) => {
        s.getRepository(Note).create({ body: "x" });
        s.manager.create(Note, { body: "y" });
        reg.getRepository(Note).create({ body: "z" });
        expect(s.manager.createQueryBuilder(Note, "n").where("n.block = 1").getQuery()).to.match(/SELECT/);
        expect(s.inTransaction).to.equal(false);
        void s.signal;
        let ran = false;
        s.afterCommit(() => void (ran = true));
        return ran;
      });
      expect(log).to.deep.equal([]);
    });

    it("the repository proxy's property reads (metadata, target) work inside a scope", async () => {
      // Regression (fixed): scopedProxy() tests `typeof prototype[property] !== "function"` on Repository.prototype;
      // `metadata` is a getter there, so the probe runs it with `this` = the prototype and throws
      // "TypeError: Cannot read properties of undefined (reading 'connection')", even inside a scope
      // (and a TypeError instead of NoActiveSessionError outside one).
      await reg.withSession(() => {
        const repo = reg.getRepository(Note);
        expect(repo.target).to.equal(Note);
        expect(repo.metadata.tableName).to.equal("notes");
      });
    });
  });

  // ---------------------------------------------------------------------------
  describe("thousands of interleaved blocks", () => {
    it("2000 mixed blocks (transfers, failing transfers, savepoints, requiresNew children, readers): money is conserved and every reader sees a consistent total", async function () {
      this.timeout(60_000);
      const ACCOUNTS = 8;
      const START = 100;
      await reg.withSession((s) =>
        s.getRepository(Account).insert(Array.from({ length: ACCOUNTS }, () => ({ balance: START }))),
      );
      const ids = await reg.withSession(async (s) => (await s.getRepository(Account).find()).map((a) => a.id));
      const random = seeded(2000);
      const expected = new Map(ids.map((id) => [id, START]));
      const pick = () => ids[Math.floor(random() * ids.length)]!;
      const total = async (s: Session) =>
        Number((await s.query<{ t: number }[]>("SELECT sum(balance) AS t FROM accounts"))[0]!.t);
      const inconsistencies: string[] = [];

      const transfer = async (
        s: Session,
        from: number,
        to: number,
        amount: number,
        fails: boolean,
        yieldMid: boolean,
      ) => {
        const accounts = s.getRepository(Account);
        await accounts.decrement({ id: from }, "balance", amount);
        if (yieldMid) await turns(1);
        if (reg.current() !== s) inconsistencies.push("scope bled in a transfer");
        if (fails) throw new Planned("transfer fails");
        await accounts.increment({ id: to }, "balance", amount);
      };
      const commitTransfer = (from: number, to: number, amount: number) => {
        expected.set(from, expected.get(from)! - amount);
        expected.set(to, expected.get(to)! + amount);
      };

      const blocks: Promise<unknown>[] = [];
      for (let i = 0; i < load(2000); i++) {
        const k = random();
        const from = pick();
        const to = pick();
        const amount = 1 + Math.floor(random() * 5);
        const fails = random() < 0.3;
        const yieldMid = random() < 0.5;
        if (k < 0.4) {
          blocks.push(
            reg
              .withTransaction((s) => transfer(s, from, to, amount, fails, yieldMid))
              .then(
                () => commitTransfer(from, to, amount),
                (e: unknown) => {
                  if (!(e instanceof Planned)) throw e;
                },
              ),
          );
        } else if (k < 0.6) {
          // outer transfer with a nested savepoint transfer that may fail; the outer survives it
          const from2 = pick();
          const to2 = pick();
          blocks.push(
            reg
              .withTransaction(async (s) => {
                await transfer(s, from, to, amount, false, yieldMid);
                const inner = await reg
                  .withTransaction((t) => transfer(t, from2, to2, 1, fails, !yieldMid))
                  .then(
                    () => true,
                    (e: unknown) => {
                      if (!(e instanceof Planned)) throw e;
                      return false;
                    },
                  );
                if ((await total(s)) !== ACCOUNTS * START) inconsistencies.push("own transaction unbalanced");
                return inner;
              })
              .then((inner) => {
                commitTransfer(from, to, amount);
                if (inner) commitTransfer(from2, to2, 1);
              }),
          );
        } else if (k < 0.75) {
          // a non-transactional parent with two requiresNew transfer children
          blocks.push(
            reg.withSession(async (p) => {
              const kids = await Promise.allSettled([
                reg.withTransaction((c) => transfer(c, from, to, amount, fails, yieldMid), {
                  propagation: "requiresNew",
                }),
                reg.withTransaction((c) => transfer(c, to, from, 1, false, !yieldMid), { propagation: "requiresNew" }),
              ]);
              if (reg.current() !== p) inconsistencies.push("parent scope bled");
              for (const kid of kids)
                if (kid.status === "rejected" && !(kid.reason instanceof Planned)) throw kid.reason;
              if (kids[0].status === "fulfilled") commitTransfer(from, to, amount);
              if (kids[1].status === "fulfilled") commitTransfer(to, from, 1);
            }),
          );
        } else {
          blocks.push(
            reg.withSession(async (s) => {
              const t = await total(s);
              if (yieldMid) await turns(1);
              const t2 = await total(s);
              if (t !== ACCOUNTS * START || t2 !== ACCOUNTS * START) inconsistencies.push(`reader saw ${t}/${t2}`);
            }),
          );
        }
      }
      const settled = await Promise.allSettled(blocks);
      const unexpected = settled.filter((o) => o.status === "rejected").map((o) => String(o.reason));
      expect(unexpected.slice(0, 5)).to.deep.equal([]);
      expect(inconsistencies.slice(0, 5)).to.deep.equal([]);
      const balances = await reg.withSession(async (s) =>
        (await s.getRepository(Account).find()).map((a) => [a.id, a.balance]),
      );
      expect(new Map(balances as [number, number][])).to.deep.equal(expected);
      expect(reg.stats()).to.include({ active: 0 });
      expect(reg.stats().opened).to.equal(reg.stats().closed);
      expect(sharedConnectionInTransaction(reg)).to.equal(false);
    });
  });
});
