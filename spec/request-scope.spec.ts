import { expect } from "chai";
import { RegistryClosedError, type Session, SessionClosedError, type SessionRegistry } from "../src/index.js";
import { requestScope } from "../src/core/block/open.js";
import type { RequestEnd } from "../src/core/scope.js";
import { Note } from "./support/entities.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { deferred, rejectionOf } from "./support/util.js";

/** The core path of every web integration, driven directly: `end` is what the framework's events call. */
forEachBackend("request scope lifetime (the core path of the web integrations)", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    await reg.ready();
  });
  afterEach(() => db.dispose());

  /** The next `close` event of the registry. */
  const nextClose = () => {
    const closed = deferred<Session>();
    const listener = ({ session }: { session: Session }) => {
      reg.off("close", listener);
      closed.resolve(session);
    };
    reg.on("close", listener);
    return closed.promise;
  };

  /** Run `body` in a request scope; resolve with its `end` and the body's result once it has run. */
  async function request<T>(body: () => Promise<T>): Promise<{ end: (reason: RequestEnd) => void; value: T }> {
    let end!: (reason: RequestEnd) => void;
    const value = await requestScope(reg, async (e) => {
      end = e;
      return body();
    });
    return { end, value };
  }

  it("a session closes as soon as the request is over and nothing of it runs", async () => {
    const { end, value: s } = await request(async () => {
      const s = reg.current();
      await s.query("SELECT 1");
      return s;
    });
    expect(s.closed).to.equal(false);
    const closed = nextClose();
    end("response-finished");
    expect(s.closed).to.equal(true);
    expect(await closed).to.equal(s);
    expect(reg.stats().active).to.equal(0);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a block running when the request is over ends as its body says, then the session closes (respond-then-continue)", async () => {
    const responded = deferred();
    const finish = deferred();
    let end!: (reason: RequestEnd) => void;
    const handler = requestScope(reg, (e) => {
      end = e; // assigned before the body's first statement, so before `responded`
      return reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "before the response", block: null });
        responded.resolve();
        await finish.promise;
        await s.getRepository(Note).insert({ body: "after the response", block: null });
        return s;
      });
    });
    await responded.promise;
    end("response-finished");
    finish.resolve();
    const s = await handler;
    expect(s.closed).to.equal(true);
    expect(await reg.withSession((t) => t.getRepository(Note).count())).to.equal(2);
  });

  it("a Session kept across the end of its request works again, and closes again once idle", async () => {
    const { end, value: s } = await request(async () => {
      const s = reg.current();
      await s.query("SELECT 1");
      return s;
    });
    end("client-disconnected");
    expect(s.closed).to.equal(true);
    const closedAgain = nextClose();
    await s.getRepository(Note).insert({ body: "late", block: null });
    expect(await s.getRepository(Note).count()).to.equal(1);
    expect(await closedAgain).to.equal(s);
    expect(s.closed).to.equal(true);
    expect(reg.stats().active).to.equal(0);
    expect(reg.stats().statements, "each statement counted once").to.equal(s.statements);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    // A transaction on it works the same way, and it closes again after the COMMIT.
    const closedOnceMore = nextClose();
    await s.run(() =>
      reg.withTransaction((t) => t.getRepository(Note).insert({ body: "in a transaction", block: null })),
    );
    expect(await closedOnceMore).to.equal(s);
    expect(await reg.withSession((t) => t.getRepository(Note).count())).to.equal(2);
    expect(reg.stats().active).to.equal(0);
  });

  it("a kept Session used while its idle close is still under way waits for it, then works", async () => {
    const { end, value: s } = await request(async () => {
      const s = reg.current();
      await s.query("SELECT 1");
      return s;
    });
    end("client-disconnected");
    // No await between the end and the use: whatever the close still has to do.
    expect(await s.query("SELECT 2 AS n")).to.have.length(1);
  });

  it("the proxies after the end of the request get a new session, closed after its use", async () => {
    const notes = reg.getRepository(Note);
    const started = deferred<(reason: RequestEnd) => void>();
    const late = deferred();
    const handler = requestScope(reg, async (end) => {
      started.resolve(end);
      await late.promise;
      const first = await notes.count();
      const s = reg.current();
      return { first, s };
    });
    (await started.promise)("client-disconnected");
    late.resolve();
    const { first, s } = await handler;
    expect(first).to.equal(0);
    await new Promise<void>((resolve) => setImmediate(resolve));
    expect(s.closed).to.equal(true);
    expect(reg.stats().active).to.equal(0);
  });

  it("a kept Session does not reopen once the registry drains: SessionClosedError saying why", async () => {
    const { end, value: s } = await request(async () => reg.current());
    await s.query("SELECT 1");
    end("client-disconnected");
    await reg.drain();
    const error = await rejectionOf(s.query("SELECT 1"));
    expect(error).to.be.instanceOf(SessionClosedError);
    expect((error as SessionClosedError).reason).to.equal("client-disconnected");
    expect(await rejectionOf(requestScope(reg, () => "never"))).to.be.instanceOf(RegistryClosedError);
  });

  it("a session force-closed by a timeout does not reopen", async () => {
    const { end, value: s } = await request(async () => {
      const s = reg.current();
      await rejectionOf(
        reg.withSession(() => new Promise(() => undefined), { timeoutMs: 20 }), // closes the scope's session
      );
      return s;
    });
    end("response-finished");
    expect(s.closed).to.equal(true);
    expect(await rejectionOf(s.query("SELECT 1"))).to.be.instanceOf(SessionClosedError);
  });
});
