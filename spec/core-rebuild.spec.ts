import { expect } from "chai";
import {
  type Session,
  SessionClosedError,
  type SessionRegistry,
  SessionTimeoutError,
  TransactionNotActiveError,
} from "../src/index.js";
import { requestScope } from "../src/core/block/open.js";
import type { RequestEnd } from "../src/core/scope.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { deferred, recordEvents, rejectionOf, turns } from "./support/util.js";

/*
 * The seams of the session core split into parts (state, level stack, connection gate,
 * transactions, closing) that a session makes only on first use: every path that may
 * reach a session which never touched the database (a kill, a drain, a timeout, a
 * request's end, a late reopen, the transaction methods) must find what it needs, and
 * the counters and events must stay what they were before the split.
 */

class Retryable extends Error {}

const never = new Promise<never>(() => undefined);

/** An INSERT into notes with the placeholders of the backend. */
function insertSql(kind: "sqlite" | "postgres"): string {
  return kind === "postgres"
    ? "INSERT INTO notes (body, block) VALUES ($1, $2)"
    : "INSERT INTO notes (body, block) VALUES (?, ?)";
}

forEachBackend("core rebuild seams", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    await reg.ready();
  });
  afterEach(() => db.dispose());

  /** Run `body` in a request scope; resolve with its `end` and the body's result once it has run. */
  async function request<T>(body: () => Promise<T>): Promise<{ end: (reason: RequestEnd) => void; value: T }> {
    let end!: (reason: RequestEnd) => void;
    const value = await requestScope(reg, async (e) => {
      end = e;
      return body();
    });
    return { end, value };
  }

  it("drain() force-closes blocks whose sessions never touched the database: they reject, abort their signal, count nothing", async function () {
    this.timeout(10_000);
    const { log, events } = recordEvents(reg, ["connect", "begin", "rollback", "close"]);
    let asked!: Session;
    let unasked!: Session;
    const started = deferred();
    // One reads its signal while it runs (the controller exists before the kill), the other never does.
    const first = reg.withSession(async (s) => {
      asked = s;
      await new Promise((resolve) => s.signal.addEventListener("abort", resolve));
      return "abandoned";
    });
    const second = reg.withSession(async (s) => {
      unasked = s;
      started.resolve();
      return never;
    });
    await started.promise;
    expect(asked.closed).to.equal(false);
    const result = await reg.drain({ timeoutMs: 0 });
    expect(result).to.deep.equal({ waited: 0, forced: 2 });
    for (const outcome of [first, second]) {
      const error = await rejectionOf(outcome);
      expect(error).to.be.instanceOf(SessionClosedError);
      expect((error as Error).message).to.match(/drain\(\)/);
    }
    for (const s of [asked, unasked]) {
      expect(s.closed).to.equal(true);
      expect(s.signal.aborted, `signal of ${String(s)}`).to.equal(true);
      expect(s.statements).to.equal(0);
      expect(await rejectionOf(s.query("SELECT 1"))).to.be.instanceOf(SessionClosedError);
    }
    expect(log.filter((l) => !l.startsWith("close"))).to.deep.equal([]);
    expect(events.filter((e) => e.event === "close").map((e) => e.statements)).to.deep.equal([0, 0]);
    expect(reg.stats()).to.include({ active: 0, closed: 2, statements: 0 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("timeoutMs on a block that never touched the database: SessionTimeoutError not blamed on the pool, timeout then close, nothing taken", async function () {
    this.timeout(10_000);
    const { log } = recordEvents(reg, ["timeout", "connect", "begin", "rollback", "close"]);
    let session!: Session;
    const error = await rejectionOf(
      reg.withSession(
        async (s) => {
          session = s;
          await new Promise((resolve) => s.signal.addEventListener("abort", resolve));
        },
        { timeoutMs: 30, name: "idle" },
      ),
    );
    expect(error).to.be.instanceOf(SessionTimeoutError);
    expect((error as Error).message).not.to.match(/waiting for a connection/);
    expect(log.map((l) => l.split("#")[0])).to.deep.equal(["timeout", "close"]);
    expect(session.closed).to.equal(true);
    const late = await rejectionOf(session.getRepository(Note).count());
    expect(late).to.be.instanceOf(SessionClosedError);
    expect((late as Error).message).to.match(/timeoutMs/);
    expect(reg.stats()).to.include({ active: 0, timeouts: 1 });
  });

  it("open(): the transaction methods of a session that never touched the database answer as before, and close() is idempotent", async () => {
    const { log } = recordEvents(reg, ["connect", "begin", "rollback", "close"]);
    const s = await reg.open({ name: "explicit" });
    expect(s.inTransaction).to.equal(false);
    expect(await rejectionOf(s.commit())).to.be.instanceOf(TransactionNotActiveError);
    expect(await rejectionOf(s.rollback())).to.be.instanceOf(TransactionNotActiveError);
    expect(() => s.beforeCommit(() => undefined)).to.throw(TransactionNotActiveError);
    let rolledBack = 0;
    s.afterRollback(() => (rolledBack += 1)); // outside a transaction: never called
    await s.close();
    await s.close();
    expect(rolledBack).to.equal(0);
    expect(s.closed).to.equal(true);
    expect(s.signal.aborted).to.equal(true);
    expect(await rejectionOf(s.commit())).to.be.instanceOf(SessionClosedError);
    expect(() => s.afterCommit(() => undefined)).to.throw(SessionClosedError);
    expect(log.map((l) => l.split("#")[0])).to.deep.equal(["close"]);
    expect(reg.stats()).to.include({ active: 0, statements: 0 });
  });

  it("holdConnection, or none, on a block that never touched the database: no connection taken, closed at once, the signal asked for in the body aborted", async () => {
    const { log } = recordEvents(reg, ["connect", "close"]);
    // The signal is asked for while the body runs: the idle close must abort that controller.
    const signals: AbortSignal[] = [];
    const s = await reg.withSession(
      (session) => {
        signals.push(session.signal);
        return session;
      },
      { holdConnection: true },
    );
    const plain = await reg.withSession((session) => {
      signals.push(session.signal);
      return session;
    });
    expect(s.closed).to.equal(true);
    expect(plain.closed).to.equal(true);
    expect(signals.map((signal) => signal.aborted)).to.deep.equal([true, true]);
    expect(log.map((l) => l.split("#")[0])).to.deep.equal(["close", "close"]);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a request's session untouched before the request ended reopens on late use; its statements are counted once across two reopens", async () => {
    const { events } = recordEvents(reg, ["open", "close"]);
    const { end, value: s } = await request(async () => reg.current());
    end("client-disconnected");
    expect(s.closed, "idle at the end of the request: closed at once").to.equal(true);
    // First reopen: one statement.
    const closedOnce = deferred();
    const onClose = (): void => closedOnce.resolve();
    reg.on("close", onClose);
    await s.query(insertSql(backend.kind), ["late-1", null]);
    await closedOnce.promise;
    reg.off("close", onClose);
    expect(s.closed).to.equal(true);
    // Second reopen: two statements at once, one reopen, one close.
    const closedTwice = deferred();
    const onCloseAgain = (): void => closedTwice.resolve();
    reg.on("close", onCloseAgain);
    await Promise.all([
      s.query(insertSql(backend.kind), ["late-2", null]),
      s.query(insertSql(backend.kind), ["late-3", null]),
    ]);
    await closedTwice.promise;
    reg.off("close", onCloseAgain);
    expect(s.statements).to.equal(3);
    expect(events.filter((e) => e.event === "open").length).to.equal(3);
    expect(events.filter((e) => e.event === "close").map((e) => e.statements)).to.deep.equal([0, 1, 3]);
    expect(reg.stats()).to.include({ active: 0, opened: 3, closed: 3, statements: 3 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    expect(await reg.withSession((t) => t.getRepository(Note).count())).to.equal(3);
  });

  it("afterCommit on a kept request session closed idle: it reopens, runs the callback at once, and closes only after it finished", async () => {
    const { end, value: s } = await request(async () => reg.current());
    end("response-finished");
    expect(s.closed).to.equal(true);
    const order: string[] = [];
    const closed = deferred();
    const onClose = ({ session }: { session: Session }): void => {
      if (session !== s) return;
      order.push("close");
      closed.resolve();
    };
    reg.on("close", onClose);
    s.afterCommit(async () => {
      order.push("callback started");
      // Work that spans the session's idle check (setImmediate after the reopen).
      await turns(3);
      order.push("callback finished");
    });
    await closed.promise;
    reg.off("close", onClose);
    expect(order).to.deep.equal(["callback started", "callback finished", "close"]);
    expect(s.closed).to.equal(true);
    expect(reg.stats().active).to.equal(0);
  });

  it("a block timed out while waiting for the connection says so; the connection handed over late goes back, and the session counts as open until then", async function () {
    this.timeout(20_000);
    const holding = deferred();
    const release = deferred();
    const holders: Promise<unknown>[] = [];
    if (backend.kind === "sqlite") {
      const held = await reg.open({ transaction: true, name: "holder" });
      await held.query("SELECT 1");
      holders.push(release.promise.then(() => held.commit()).finally(() => held.close()));
      holding.resolve();
    } else {
      let begun = 0;
      for (let i = 0; i < 5; i++) {
        holders.push(
          reg.withTransaction(async (s) => {
            await s.query("SELECT 1");
            if (++begun === 5) holding.resolve();
            await release.promise;
          }),
        );
      }
    }
    await holding.promise;
    // The body of a transactional block runs only once it has begun: find its session by name.
    let waiter!: Session;
    reg.on("open", ({ session, name }) => {
      if (name === "waiter") waiter = session;
    });
    const closedWaiter = deferred();
    const onClose = ({ session }: { session: Session }): void => {
      if (session === waiter) closedWaiter.resolve();
    };
    reg.on("close", onClose);
    const error = await rejectionOf(
      reg.withTransaction((s) => s.query("SELECT 1"), { timeoutMs: 100, name: "waiter" }),
    );
    expect(error).to.be.instanceOf(SessionTimeoutError);
    expect((error as Error).message).to.match(/\(waiter\).*while waiting for a connection/);
    expect(waiter.closed).to.equal(true);
    // A pool still owes the abandoned session a connection: it counts as open until it is back.
    const owed = backend.kind === "postgres" ? 1 : 0;
    expect(reg.stats().active).to.equal(holders.length + owed);
    release.resolve();
    await Promise.all(holders);
    await closedWaiter.promise;
    reg.off("close", onClose);
    expect(reg.stats().active).to.equal(0);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    // Every connection is usable again.
    expect(await reg.withTransaction((s) => s.getRepository(Note).count(), { timeoutMs: 5_000 })).to.equal(0);
  });

  it("begin/commit/rollback events of a retried block carry its attempt and savepoint flags, as before the split", async () => {
    const { events } = recordEvents(reg, ["begin", "commit", "rollback"]);
    let attempts = 0;
    const value = await reg.withTransaction(
      async (s) => {
        attempts += 1;
        await s.query(insertSql(backend.kind), [`attempt ${attempts}`, attempts]);
        await reg.withTransaction((inner) => inner.query(insertSql(backend.kind), ["inner", attempts]));
        if (attempts === 1) throw new Retryable("once");
        return attempts;
      },
      { retry: { retries: 1, baseDelayMs: 1, maxDelayMs: 1, retryOn: (e) => e instanceof Retryable } },
    );
    expect(value).to.equal(2);
    expect(events.map((e) => [e.event, e.savepoint === true, e.attempt])).to.deep.equal([
      ["begin", false, 1],
      ["begin", true, undefined],
      ["commit", true, undefined],
      ["rollback", false, 1],
      ["begin", false, 2],
      ["begin", true, undefined],
      ["commit", true, undefined],
      ["commit", false, 2],
    ]);
    for (const e of events.filter((x) => x.event !== "begin")) expect(e.durationMs).to.be.a("number");
    expect(reg.stats()).to.include({ commits: 1, rollbacks: 1 });
    expect(await reg.withSession((t) => t.getRepository(Note).find({ order: { id: "ASC" } }))).to.have.length(2);
  });

  it("concurrent blocks of one scope's session take turns: a second transaction and a scope-level statement wait for the first to end", async function () {
    this.timeout(10_000);
    const order: string[] = [];
    const firstIn = deferred();
    const letFirstCommit = deferred();
    const { events } = recordEvents(reg, ["commit"]);
    await reg.scope(async () => {
      const s = reg.current();
      const first = reg.withTransaction(async (t) => {
        expect(t).to.equal(s);
        await t.query(insertSql(backend.kind), ["first", 1]);
        order.push("first in");
        firstIn.resolve();
        await letFirstCommit.promise;
        order.push("first done");
      });
      await firstIn.promise;
      const second = reg.withTransaction(async (t) => {
        expect(t).to.equal(s);
        order.push(`second in after ${events.length} commit(s)`);
        await t.query(insertSql(backend.kind), ["second", 2]);
      });
      const outside = s.query("SELECT 1").then(() => order.push(`statement after ${events.length} commit(s)`));
      // Neither may start while the first block owns the transaction.
      await turns(5);
      expect(order).to.deep.equal(["first in"]);
      letFirstCommit.resolve();
      await Promise.all([first, second, outside]);
    });
    // Waiters are let through in the order they came: the second block begins (and owns the
    // transaction) before the scope-level statement gets its turn, after that COMMIT.
    expect(order).to.deep.equal([
      "first in",
      "first done",
      "second in after 1 commit(s)",
      "statement after 2 commit(s)",
    ]);
    expect(await reg.withSession((t) => t.getRepository(Note).count())).to.equal(2);
    expect(reg.stats().active).to.equal(0);
  });
});
