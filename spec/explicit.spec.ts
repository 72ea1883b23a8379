import { expect } from "chai";
import {
  openSession,
  PropagationError,
  RegistryClosedError,
  type Session,
  SessionClosedError,
  type SessionRegistry,
  TransactionNotActiveError,
} from "../src/index.js";
import { Note } from "./support/entities.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { rejectionOf } from "./support/util.js";

class Boom extends Error {}

forEachBackend("explicit sessions: open(), close(), run(), await using", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
  });
  afterEach(() => db.dispose());

  const count = () => reg.withSession((s) => s.getRepository(Note).count());

  it("open() gives a session the caller owns: not current, closed by close(), idempotently", async () => {
    const s = await reg.open({ name: "import" });
    expect(reg.tryCurrent()).to.equal(undefined);
    await s.getRepository(Note).save({ body: "a", block: null });
    expect(s.closed).to.equal(false);
    expect(reg.stats().active).to.equal(1);
    await s.close();
    await s.close();
    expect(s.closed).to.equal(true);
    expect(s.signal.aborted).to.equal(true);
    expect(reg.stats().active).to.equal(0);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    expect(await count()).to.equal(1);
    const late = await rejectionOf(s.query("SELECT 1"));
    expect(late).to.be.instanceOf(SessionClosedError);
  });

  it("a transaction from open({ transaction: true }) commits with s.commit() and rolls back when closed without it", async () => {
    {
      await using s = await reg.open({ transaction: true });
      expect(s.inTransaction).to.equal(true);
      await s.getRepository(Note).save({ body: "kept", block: null });
      await s.commit();
    }
    const rolledBack: string[] = [];
    {
      await using s = await reg.open({ transaction: true });
      s.afterRollback(() => rolledBack.push("afterRollback"));
      await s.getRepository(Note).save({ body: "dropped", block: null });
    }
    expect(rolledBack).to.deep.equal(["afterRollback"]);
    const bodies = await reg.withSession((s) => s.getRepository(Note).find());
    expect(bodies.map((n) => n.body)).to.deep.equal(["kept"]);
    expect(reg.stats().active).to.equal(0);
  });

  it("await using closes the session when the block is left by an exception", async () => {
    let kept: Session | undefined;
    const error = await rejectionOf(
      (async () => {
        await using s = await reg.open();
        kept = s;
        await s.begin();
        await s.getRepository(Note).save({ body: "x", block: null });
        throw new Boom("fails");
      })(),
    );
    expect(error).to.be.instanceOf(Boom);
    expect(kept!.closed).to.equal(true);
    expect(await count()).to.equal(0);
  });

  it("run() makes it the current session: proxies and joining blocks use it, inside its transaction", async () => {
    const notes = reg.getRepository(Note);
    await using s = await reg.open({ transaction: true });
    const seen = await s.run(async () => {
      await notes.save({ body: "via proxy", block: null });
      await reg.withTransaction(async (inner) => {
        expect(inner).to.equal(s);
        await inner.getRepository(Note).save({ body: "savepoint", block: null });
      });
      return reg.current();
    });
    expect(seen).to.equal(s);
    expect(reg.tryCurrent()).to.equal(undefined);
    if (backend.kind === "postgres") {
      // Not committed: another session does not see the rows.
      expect(await count()).to.equal(0);
    }
    await s.commit();
    expect(await count()).to.equal(2);
  });

  it("run() on a closed session rejects with SessionClosedError without running the body; a non-function with TypeError", async () => {
    const s = await reg.open();
    await s.close();
    let ran = false;
    const error = await rejectionOf(s.run(() => (ran = true)));
    expect(error).to.be.instanceOf(SessionClosedError);
    expect(ran).to.equal(false);
    expect(await rejectionOf(s.run(42 as never))).to.be.instanceOf(TypeError);
  });

  it("close() on a session a block owns rejects with PropagationError and leaves it open", async () => {
    await reg.withSession(async (s) => {
      const error = await rejectionOf(s.close());
      expect(error).to.be.instanceOf(PropagationError);
      expect((error as Error).message).to.match(/registry\.open\(\)/);
      expect(s.closed).to.equal(false);
      await s.query("SELECT 1");
    });
  });

  it("timeoutMs force-closes it: the transaction rolls back, later use fails with SessionClosedError", async () => {
    const timeouts: number[] = [];
    reg.on("timeout", ({ session }) => timeouts.push(session.id));
    const s = await reg.open({ transaction: true, timeoutMs: 50 });
    await s.getRepository(Note).save({ body: "late", block: null });
    await new Promise<void>((resolve) => s.signal.addEventListener("abort", () => resolve(), { once: true }));
    expect(timeouts).to.deep.equal([s.id]);
    const error = await rejectionOf(s.query("SELECT 1"));
    expect(error).to.be.instanceOf(SessionClosedError);
    expect((error as Error).message).to.contain("exceeded its timeoutMs of 50 ms");
    await s.close();
    expect(await count()).to.equal(0);
  });

  it("refuses block options that do not apply, by name", async () => {
    for (const key of ["propagation", "savepoint", "durable", "retry"]) {
      const error = await rejectionOf(reg.open({ [key]: key === "retry" ? 1 : true }));
      expect(error).to.be.instanceOf(TypeError);
      expect((error as Error).message).to.contain(`\`${key}\` does not apply to open()`);
    }
    expect(await rejectionOf(reg.open({ isolation: "SOMETIMES" as never }))).to.be.instanceOf(RangeError);
    expect(reg.stats().opened).to.equal(0);
  });

  it("openSession() uses the registry option, and open() rejects with RegistryClosedError once drain() has begun", async () => {
    const s = await openSession({ registry: reg });
    expect(s.registry).to.equal(reg);
    const draining = reg.drain();
    const error = await rejectionOf(reg.open());
    expect(error).to.be.instanceOf(RegistryClosedError);
    await s.close();
    expect(await draining).to.deep.equal({ waited: 1, forced: 0 });
  });

  if (backend.kind === "sqlite") {
    it("inside an open transaction of the caller's scope, open() rejects at once with PropagationError on SQLite", async () => {
      await reg.withTransaction(async () => {
        const error = await rejectionOf(reg.open());
        expect(error).to.be.instanceOf(PropagationError);
        expect((error as Error).message).to.contain("open()");
      });
      expect(reg.stats().active).to.equal(0);
    });
  } else {
    it("never joins the caller's session: its own connection, its own transaction", async () => {
      await reg.withTransaction(async (outer) => {
        await outer.getRepository(Note).save({ body: "outer", block: null });
        await using s = await reg.open();
        expect(s).to.not.equal(outer);
        expect(await s.getRepository(Note).count()).to.equal(0);
      });
    });
  }

  describe("beforeCommit", () => {
    it("runs inside the outermost transaction, in order, just before COMMIT; its statements commit with it", async () => {
      const order: string[] = [];
      await reg.withTransaction(async (s) => {
        s.beforeCommit(async () => {
          order.push("first");
          await s.getRepository(Note).save({ body: "from beforeCommit", block: null });
        });
        await reg.withTransaction(async (inner) => {
          inner.beforeCommit(() => order.push("from a savepoint"));
        });
        s.afterCommit(() => order.push("afterCommit"));
        order.push("body");
      });
      expect(order).to.deep.equal(["body", "first", "from a savepoint", "afterCommit"]);
      expect(await count()).to.equal(1);
    });

    it("one that throws rolls the transaction back and the block rejects with its error", async () => {
      const order: string[] = [];
      const error = await rejectionOf(
        reg.withTransaction(async (s) => {
          await s.getRepository(Note).save({ body: "undone", block: null });
          s.beforeCommit(() => {
            throw new Boom("invariant broken");
          });
          s.beforeCommit(() => order.push("never"));
          s.afterCommit(() => order.push("afterCommit"));
          s.afterRollback(() => order.push("afterRollback"));
        }),
      );
      expect(error).to.be.instanceOf(Boom);
      expect(order).to.deep.equal(["afterRollback"]);
      expect(await count()).to.equal(0);
    });

    it("registered in a savepoint that rolls back, it is dropped", async () => {
      const order: string[] = [];
      await reg.withTransaction(async () => {
        await rejectionOf(
          reg.withTransaction(async (inner) => {
            inner.beforeCommit(() => order.push("dropped"));
            throw new Boom("inner");
          }),
        );
      });
      expect(order).to.deep.equal([]);
    });

    it("runs on s.commit() of an explicit transaction; a throw there rolls back and rejects", async () => {
      await using s = await reg.open({ transaction: true });
      await s.getRepository(Note).save({ body: "x", block: null });
      s.beforeCommit(() => {
        throw new Boom("no");
      });
      expect(await rejectionOf(s.commit())).to.be.instanceOf(Boom);
      expect(s.inTransaction).to.equal(false);
      expect(await count()).to.equal(0);
    });

    it("outside a transaction it throws TransactionNotActiveError", async () => {
      await reg.withSession((s) => {
        expect(() => s.beforeCommit(() => undefined)).to.throw(TransactionNotActiveError);
        expect(() => s.beforeCommit(42 as never)).to.throw(TypeError);
      });
    });
  });

  describe("statements", () => {
    it("counts the session's statements, on the session, the close event and stats()", async () => {
      const closes: (number | undefined)[] = [];
      reg.on("close", ({ statements }) => closes.push(statements));
      const before = reg.stats().statements;
      await reg.withTransaction(async (s) => {
        expect(s.statements).to.equal(0);
        await s.query("SELECT 1");
        await s.getRepository(Note).count();
        expect(s.statements).to.equal(2);
        expect(reg.stats().statements).to.equal(before + 2);
      });
      expect(closes).to.deep.equal([2]);
      expect(reg.stats().statements).to.equal(before + 2);
    });
  });
});
