import { expect } from "chai";
import type { EntitySubscriberInterface, TransactionCommitEvent } from "typeorm";
import { EventSubscriber } from "typeorm";
import { createSessionRegistry, type Session, SessionClosedError, type SessionRegistry } from "../src/index.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { deferred, rejectionOf } from "./support/util.js";

/** Every way a late continuation could reach the session, each reported as its outcome. */
async function lateUses(reg: SessionRegistry, s: Session): Promise<Record<string, string>> {
  const attempt = async (f: () => unknown): Promise<string> => {
    try {
      await f();
      return "ran";
    } catch (error) {
      return error instanceof SessionClosedError ? "SessionClosedError" : `other: ${String(error)}`;
    }
  };
  const sync = (f: () => unknown): string => {
    try {
      f();
      return "ran";
    } catch (error) {
      return error instanceof SessionClosedError ? "SessionClosedError (sync)" : `other: ${String(error)}`;
    }
  };
  return {
    query: await attempt(() => s.query("SELECT 1")),
    manager: await attempt(() => s.manager.find(Note)),
    repository: await attempt(() => s.getRepository(Note).insert({ body: "late", block: 9 })),
    queryBuilder: await attempt(() => s.manager.createQueryBuilder(Note, "n").getMany()),
    managerTransaction: await attempt(() => s.manager.transaction(() => Promise.resolve())),
    begin: await attempt(() => s.begin()),
    proxyManager: await attempt(() => reg.manager.find(Note)),
    proxyRepository: await attempt(() => reg.getRepository(Note).count()),
    current: sync(() => reg.current()),
    tryCurrent: sync(() => reg.tryCurrent()),
    joiningBlock: await attempt(() => reg.withSession(() => "joined")),
    joiningTransaction: await attempt(() => reg.withTransaction(() => "joined")),
  };
}

const ALL_CLOSED = {
  query: "SessionClosedError",
  manager: "SessionClosedError",
  repository: "SessionClosedError",
  queryBuilder: "SessionClosedError",
  managerTransaction: "SessionClosedError",
  begin: "SessionClosedError",
  proxyManager: "SessionClosedError",
  proxyRepository: "SessionClosedError",
  current: "SessionClosedError (sync)",
  tryCurrent: "SessionClosedError (sync)",
  joiningBlock: "SessionClosedError",
  joiningTransaction: "SessionClosedError",
};

forEachBackend("guarantee 9: a closing or closed session accepts no new work", (backend: Backend) => {
  let db: TestDb;
  beforeEach(async () => {
    db = await backend.open();
  });
  afterEach(() => db.dispose());

  it("after the block settled: every path fails with SessionClosedError", async () => {
    const reg = db.registry();
    const ended = deferred();
    let late!: Promise<Record<string, string>>;
    let session!: Session;
    await reg.withSession(async (s) => {
      session = s;
      await s.query("SELECT 1");
      // A continuation of the block that runs after the block is over.
      late = (async () => {
        await ended.promise;
        return lateUses(reg, s);
      })();
    });
    ended.resolve();
    expect(await late).to.deep.equal(ALL_CLOSED);
    expect(session.closed).to.equal(true);
    const count = await reg.withSession((s) => s.getRepository(Note).count());
    expect(count, "no late write got through").to.equal(0);
  });

  it("while the COMMIT is in flight: late continuations neither join the transaction nor open a new one", async () => {
    const committing = deferred();
    const lateDone = deferred<Record<string, string>>();
    let armed = false; // not during synchronize at initialization
    @EventSubscriber()
    class OnCommit implements EntitySubscriberInterface {
      async beforeTransactionCommit(_event: TransactionCommitEvent): Promise<void> {
        if (!armed) return;
        committing.resolve();
        // Hold the COMMIT until the late continuation has tried everything.
        await lateDone.promise;
      }
    }
    const ds = db.dataSource({ subscribers: [OnCommit] });
    const reg = createSessionRegistry({ dataSource: ds });
    try {
      await reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "committed", block: 1 });
        armed = true;
        void (async () => {
          await committing.promise;
          lateDone.resolve(await lateUses(reg, s));
        })();
      });
      expect(await lateDone.promise).to.deep.equal(ALL_CLOSED);
      const rows = await reg.withSession((s) => s.getRepository(Note).find());
      expect(rows.map((r) => r.body)).to.deep.equal(["committed"]);
    } finally {
      await ds.destroy();
    }
  });

  it("a subscriber running inside the final COMMIT may still use the session's manager", async () => {
    let armed = false; // not during synchronize at initialization
    @EventSubscriber()
    class Audit implements EntitySubscriberInterface {
      async beforeTransactionCommit(event: TransactionCommitEvent): Promise<void> {
        if (armed) await event.manager.insert(Note, { body: "audit", block: 0 });
      }
    }
    const ds = db.dataSource({ subscribers: [Audit] });
    const reg = createSessionRegistry({ dataSource: ds });
    try {
      await reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "work", block: 1 });
        armed = true;
      });
      armed = false;
      const rows = await reg.withSession((s) => s.getRepository(Note).find({ order: { id: "ASC" } }));
      expect(rows.map((r) => r.body)).to.deep.equal(["work", "audit"]);
    } finally {
      await ds.destroy();
    }
  });

  it("SessionClosedError names the session and says what to do", async () => {
    const reg = db.registry();
    const s = await reg.withSession((session) => session, { name: "InvoiceJob.run" });
    const error = await rejectionOf(s.query("SELECT 1"));
    expect(error).to.be.instanceOf(SessionClosedError);
    expect(error).to.have.property("code", "ERR_SESSION_CLOSED");
    expect((error as Error).message).to.match(/^session #\d+ \(InvoiceJob\.run\) is closed.*detached\(\)/s);
  });

  it("remove() closes the scope's session at once; the next current() creates a fresh one", async () => {
    const reg = db.registry();
    await reg.withSession(async (first) => {
      await first.begin();
      await first.getRepository(Note).insert({ body: "undone by remove", block: 1 });
      await reg.remove();
      await reg.remove(); // idempotent
      expect(first.closed).to.equal(true);
      const second = reg.current();
      expect(second).not.to.equal(first);
      expect(await second.getRepository(Note).count()).to.equal(0);
    });
    await reg.remove(); // outside any scope: nothing to do
    expect(reg.stats()).to.include({ active: 0, opened: 2, closed: 2 });
  });

  it("a transactional block whose session was removed under it rejects instead of claiming a commit", async () => {
    const reg = db.registry();
    const error = await rejectionOf(
      reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "x", block: 1 });
        await reg.remove();
      }),
    );
    expect(error).to.be.instanceOf(SessionClosedError);
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(0);
  });

  it("a block that ends while its nested transaction waits for the connection cancels that wait and harms nobody", async () => {
    const reg = db.registry();
    const holding = deferred();
    const gate = deferred();
    const other = reg.withTransaction(async (s) => {
      await s.getRepository(Note).insert({ body: "other", block: 1 });
      holding.resolve();
      await gate.promise;
    });
    await holding.promise;
    let orphan!: Promise<unknown>;
    await reg.withSession(() => {
      // Not awaited: queued for the connection when the block ends.
      orphan = reg.withTransaction((s) => s.getRepository(Note).insert({ body: "orphan", block: 2 }));
    });
    expect(await rejectionOf(orphan)).to.be.instanceOf(SessionClosedError);
    gate.resolve();
    await other;
    await reg.withTransaction((s) => s.getRepository(Note).insert({ body: "later", block: 3 }));
    const rows = await reg.withSession((s) => s.getRepository(Note).find({ order: { id: "ASC" } }));
    expect(rows.map((r) => r.body)).to.deep.equal(["other", "later"]);
    expect(connectionsInUse(reg.dataSource!), "a connection the pool handed over late was given back").to.equal(0);
  });

  it("a subscriber may use the session during the ROLLBACK of a transaction the body left open", async () => {
    let armed = false;
    const seen: number[] = [];
    @EventSubscriber()
    class OnRollback implements EntitySubscriberInterface {
      async afterTransactionRollback(event: TransactionCommitEvent): Promise<void> {
        if (armed) seen.push((await event.manager.query<{ n: number }[]>("SELECT 7 AS n"))[0]!.n);
      }
    }
    const ds = db.dataSource({ subscribers: [OnRollback] });
    const reg = createSessionRegistry({ dataSource: ds });
    try {
      await reg.withSession(async (s) => {
        armed = true;
        await s.begin();
        await s.getRepository(Note).insert({ body: "left open", block: 1 });
      });
      expect(seen).to.deep.equal([7]);
      expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(0);
    } finally {
      await ds.destroy();
    }
  });
});
