import { expect } from "chai";
import {
  createSessionRegistry,
  currentSession,
  PropagationError,
  type Session,
  type SessionRegistry,
} from "../src/index.js";
import { useTransactionalTests } from "../src/testing/index.js";
import { type Backend, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { rejectionOf } from "./support/util.js";

class Boom extends Error {}

/** "Code under test": it knows nothing of the tests around it. */
async function signup(reg: SessionRegistry, body: string, fail = false): Promise<void> {
  await reg.withTransaction(async (s) => {
    await s.getRepository(Note).insert({ body, block: 1 });
    if (fail) throw new Boom(body);
  });
}

forEachBackend("useTransactionalTests()", (backend: Backend) => {
  let db: TestDb;
  const reg = createSessionRegistry({ name: `tx-tests-${backend.kind}` });
  const notes = reg.getRepository(Note);
  before(async () => {
    db = await backend.open();
    reg.configure({ dataSource: db.dataSource() });
  });
  after(async () => {
    // Out of test mode now: nothing any test committed is left.
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(0);
    await db.dispose();
  });

  const testSession = useTransactionalTests({ registry: reg });

  it("blocks of the code under test commit into the test's transaction", async () => {
    await signup(reg, "ada");
    await signup(reg, "bob");
    expect(await notes.count()).to.equal(2);
    expect(currentSession(reg)).to.equal(testSession());
  });

  it("the next test sees a clean database", async () => {
    expect(await notes.count()).to.equal(0);
  });

  it("a failing block undoes only its own work, as if it were outermost", async () => {
    await signup(reg, "kept");
    expect(await rejectionOf(signup(reg, "undone", true))).to.be.instanceOf(Boom);
    expect((await notes.find()).map((n) => n.body)).to.deep.equal(["kept"]);
  });

  it("the outer transaction is invisible: durable is allowed, isolation and readOnly are ignored", async () => {
    expect(reg.current().inTransaction).to.equal(false);
    await reg.withTransaction(async (s) => expect(s.inTransaction).to.equal(true), { durable: true });
    await reg.withTransaction(() => undefined, { isolation: "SERIALIZABLE" });
    await reg.withTransaction((s) => s.getRepository(Note).insert({ body: "written", block: 1 }), { readOnly: true });
    expect(await notes.count()).to.equal(1);
    // Nested in a block's own transaction, the usual rules apply again.
    await reg.withTransaction(async () => {
      expect(await rejectionOf(reg.withTransaction(() => 1, { durable: true }))).to.be.instanceOf(PropagationError);
    });
  });

  it("afterCommit runs when the block's savepoint is released, and at once outside a transaction", async () => {
    const seen: string[] = [];
    await reg.withTransaction(async (s) => {
      s.afterCommit(() => seen.push("after the block"));
      await reg.withTransaction((inner) => inner.afterCommit(() => seen.push("after the outer block, nested")));
      seen.push("body done");
    });
    reg.current().afterCommit(() => seen.push("at once"));
    expect(seen).to.deep.equal(["body done", "after the block", "after the outer block, nested", "at once"]);
  });

  it("request scopes and TypeORM's own transactions join the test's transaction", async () => {
    let inScope!: Session;
    await reg.scope(async () => {
      inScope = reg.current();
      await reg.manager.transaction((m) => m.insert(Note, { body: "via manager.transaction", block: 1 }));
      await reg.getRepository(Note).save({ body: "via save", block: 2 });
    });
    expect(inScope).to.equal(testSession());
    expect(await notes.count()).to.equal(2);
  });

  if (backend.kind === "sqlite") {
    it("a second session would wait for the test's connection: it rejects with PropagationError", async () => {
      const error = await rejectionOf(reg.withSession((s) => s.query("SELECT 1"), { propagation: "requiresNew" }));
      expect(error).to.be.instanceOf(PropagationError);
    });
  }

  describe("with runAfterCommit: false", () => {
    const other = createSessionRegistry({ name: `tx-tests-drop-${backend.kind}` });
    before(() => other.configure({ dataSource: db.dataSource() }));
    useTransactionalTests({ registry: other, runAfterCommit: false });

    it("drops afterCommit callbacks", async () => {
      const seen: string[] = [];
      await other.withTransaction((s) => s.afterCommit(() => seen.push("dropped")));
      other.current().afterCommit(() => seen.push("dropped too"));
      expect(seen).to.deep.equal([]);
    });
  });
});

describe("useTransactionalTests() misuse", () => {
  it("rejects invalid options", () => {
    expect(() => useTransactionalTests({ runAfterCommit: "yes" as never })).to.throw(TypeError, /runAfterCommit/);
    expect(() => useTransactionalTests({ registry: {} as never })).to.throw(TypeError, /registry/);
  });
});
