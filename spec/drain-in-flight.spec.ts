// drain() lets work accepted before it began finish: a web request, or a registry.scope(), that
// had not touched the database yet when drain() began may still open its session, and drain()
// waits for it (README, "Install and set up in your app", step 3: server.close(), then drain()).
import { expect } from "chai";
import express from "express";
import { type DrainResult, RegistryClosedError, type SessionRegistry } from "../src/index.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { type Backend, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { listen, send, within } from "./support/http.js";
import { deferred, rejectionOf } from "./support/util.js";

forEachBackend("drain: work accepted before drain() began finishes", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;

  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    await reg.withSession((s) => s.query("SELECT 1")); // initialize
  });
  afterEach(() => db.dispose());

  /** Whether `promise` has settled, after the turns already queued have run. */
  const settled = async (promise: Promise<unknown>): Promise<boolean> => {
    let done = false;
    void promise.then(
      () => (done = true),
      () => (done = true),
    );
    for (let i = 0; i < 20; i++) await new Promise<void>((resolve) => setImmediate(resolve));
    return done;
  };

  it("a request whose handler first touches the database after drain() began: its transaction commits, and drain() waits for it", async () => {
    const app = express();
    const arrived = deferred();
    const go = deferred();
    app.use(sessionMiddleware({ registry: reg }));
    // A plain async handler, as Express 4 apps write them: nothing catches its rejection.
    app.post("/", async (_req, res) => {
      arrived.resolve();
      await go.promise;
      await reg.withTransaction((s) => s.getRepository(Note).save({ body: "accepted" }));
      res.status(201).end();
    });
    const server = await listen(app);
    try {
      const response = send(server.port, "/", { method: "POST" });
      await within(arrived.promise, "the request to reach its handler");
      const draining: Promise<DrainResult> = reg.drain();
      expect(await settled(draining), "drain() waits for the request in flight").to.equal(false);
      go.resolve();
      expect((await response).status).to.equal(201);
      expect(await within(draining, "drain() to finish")).to.include({ forced: 0 });
    } finally {
      await server.close();
    }
    expect(await reg.dataSource!.getRepository(Note).countBy({ body: "accepted" })).to.equal(1);
    // New work is still refused.
    expect(await rejectionOf(reg.withSession((s) => s.query("SELECT 1")))).to.be.instanceOf(RegistryClosedError);
    expect(reg.stats()).to.include({ active: 0 });
  });

  it("registry.scope() begun before drain(): its session is opened during the drain, and drain() waits for the scope", async () => {
    const go = deferred();
    const inside = deferred();
    const scoped = reg.scope(async () => {
      inside.resolve();
      await go.promise;
      return reg.withTransaction((s) => s.getRepository(Note).save({ body: "scoped" }));
    });
    await within(inside.promise, "the scope's body to start");
    const draining = reg.drain();
    expect(await settled(draining), "drain() waits for the scope").to.equal(false);
    go.resolve();
    await scoped;
    expect(await within(draining, "drain() to finish")).to.include({ forced: 0 });
    expect(await reg.dataSource!.getRepository(Note).countBy({ body: "scoped" })).to.equal(1);
    // A scope begun once drain() has begun is refused, as before.
    expect(await rejectionOf(reg.scope(() => undefined))).to.be.instanceOf(RegistryClosedError);
  });
});
