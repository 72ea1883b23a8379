import type { ClientRequest } from "node:http";
import { expect } from "chai";
import express, { type ErrorRequestHandler, type Express } from "express";
import {
  createSessionRegistry,
  currentSession,
  NoActiveSessionError,
  RegistryNotConfiguredError,
  type Session,
  type SessionRegistry,
  tryCurrentSession,
} from "../src/index.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { createRegistry as createExampleRegistry, start as startExample } from "../examples/express-app.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { idle, listen, send, within } from "./support/http.js";
import { deferred, recordEvents, turns } from "./support/util.js";

forEachBackend("express: sessionMiddleware", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  let app: Express;
  let server: { port: number; close: () => Promise<void> } | undefined;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    app = express();
    // Express's default error handler prints stacks unless the app runs in "test".
    app.set("env", "test");
    app.use(sessionMiddleware({ registry: reg }));
  });
  afterEach(async () => {
    await server?.close();
    server = undefined;
    await db.dispose();
  });

  const serve = async (): Promise<number> => {
    server = await listen(app);
    return server.port;
  };
  const count = (body: string) => reg.withSession((s) => s.getRepository(Note).countBy({ body }));

  it("a request that never touches the database opens no session and takes no connection", async () => {
    const { log } = recordEvents(reg);
    app.get("/pure", (_req, res) => {
      res.json({ session: tryCurrentSession(reg)?.id ?? null });
    });
    app.get("/looks", (_req, res) => {
      // Asking for the session creates it, but only a statement takes a connection.
      res.json({ session: currentSession(reg).id });
    });
    const port = await serve();
    const pure = await send(port, "/pure");
    expect(pure).to.deep.equal({ status: 200, body: '{"session":null}' });
    expect(log).to.deep.equal([]);
    const looks = await send(port, "/looks");
    const { session } = JSON.parse(looks.body) as { session: number };
    await idle(reg);
    expect(log).to.deep.equal([`open#${session}`, `close#${session}`]);
  });

  it("closes the request's session after the response: close event, stats().active 0, connection released", async () => {
    const { log } = recordEvents(reg);
    app.get("/notes", async (_req, res) => {
      const s = currentSession(reg);
      res.json({ session: s.id, notes: await s.getRepository(Note).count() });
    });
    const port = await serve();
    const replies = [await send(port, "/notes"), await send(port, "/notes")];
    await idle(reg);
    const ids = replies.map((r) => (JSON.parse(r.body) as { session: number }).session);
    expect(replies.map((r) => r.status)).to.deep.equal([200, 200]);
    expect(ids[0]).to.not.equal(ids[1]);
    for (const id of ids) expect(log).to.include.members([`open#${id}`, `connect#${id}`, `close#${id}`]);
    expect(reg.stats()).to.include({ active: 0, opened: 2, closed: 2 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a transaction opened by hand stays open past the response until the handler ends it, then commits whole", async () => {
    const { log } = recordEvents(reg);
    const committed = deferred<number>();
    reg.on("commit", (e) => committed.resolve(e.session.id));
    const finished = deferred();
    app.post("/by-hand", async (_req, res) => {
      const s = currentSession(reg);
      await s.begin();
      await s.getRepository(Note).save({ body: "by hand 1" });
      res.on("finish", () => finished.resolve());
      res.status(201).json({ session: s.id });
      await finished.promise; // the request is over: the open transaction keeps the session
      await s.getRepository(Note).save({ body: "by hand 2" });
      await s.commit();
    });
    const port = await serve();
    const reply = await send(port, "/by-hand", { method: "POST" });
    expect(reply.status).to.equal(201);
    const { session } = JSON.parse(reply.body) as { session: number };
    expect(await within(committed.promise, "the handler's COMMIT")).to.equal(session);
    await idle(reg);
    expect(log).to.include.members([`begin#${session}`, `commit#${session}`, `close#${session}`]);
    expect(await count("by hand 1")).to.equal(1);
    expect(await count("by hand 2")).to.equal(1);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a transaction opened by hand and never ended keeps its session: reported as a leak, rolled back by drain()", async () => {
    const leaky = createSessionRegistry({ name: "leaky", dataSource: db.dataSource(), leakDetectionMs: 200 });
    const leaked = deferred<number>();
    leaky.on("leak", (e) => leaked.resolve(e.session.id));
    const { log } = recordEvents(leaky);
    const forgetful = express();
    forgetful.use(sessionMiddleware({ registry: leaky }));
    forgetful.post("/forgetful", async (_req, res) => {
      const s = currentSession(leaky);
      await s.begin();
      await s.getRepository(Note).save({ body: "never committed" });
      res.json({ session: s.id }); // no commit, no rollback
    });
    server = await listen(forgetful);
    const { session } = JSON.parse((await send(server.port, "/forgetful", { method: "POST" })).body) as {
      session: number;
    };
    expect(await within(leaked.promise, "the leak report")).to.equal(session);
    expect(leaky.stats().active).to.equal(1);
    expect(await within(leaky.drain({ timeoutMs: 100 }), "drain()")).to.deep.equal({ waited: 0, forced: 1 });
    expect(log).to.include.members([`rollback#${session}`, `close#${session}`]);
    expect(await count("never committed")).to.equal(0);
    expect(connectionsInUse(leaky.dataSource!)).to.equal(0);
  });

  it("a Session kept past a client's disconnect works again (and closes again); the proxies go on with a new session", async () => {
    const { log } = recordEvents(reg);
    const first = deferred<number>();
    const after = deferred<{ kept: unknown; count: number; session: number }>();
    app.get("/slow", async (_req, res) => {
      const s = currentSession(reg);
      await s.query("SELECT 1");
      first.resolve(s.id);
      await new Promise((resolve) => s.signal.addEventListener("abort", resolve, { once: true }));
      const kept = await s.query<unknown>("SELECT 1").catch((error: unknown) => error);
      const notes = await reg.getRepository(Note).count();
      after.resolve({ kept, count: notes, session: currentSession(reg).id });
      res.end();
    });
    const port = await serve();
    let client: ClientRequest | undefined;
    const reply = send(port, "/slow", { sent: (req) => (client = req) }).catch((e: unknown) => e);
    const session = await within(first.promise, "the handler's first statement");
    client!.destroy();
    expect(await reply).to.be.an("error"); // socket hang up
    const seen = await within(after.promise, "the handler to go on");
    expect(seen.kept).to.have.length(1);
    expect(seen.count).to.equal(0);
    expect(seen.session).to.not.equal(session);
    await idle(reg);
    expect(log).to.include.members([`close#${session}`, `open#${seen.session}`, `close#${seen.session}`]);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("200 concurrent requests each see only their own session across awaits, timers and queries", async () => {
    const sightings = new Map<number, Session[]>();
    app.get("/who", async (req, res) => {
      const own = currentSession(reg);
      const seen: Session[] = [];
      await turns(1);
      seen.push(currentSession(reg));
      await own.query("SELECT 1");
      seen.push(currentSession(reg));
      await new Promise((resolve) => setTimeout(resolve, 1));
      seen.push(currentSession(reg));
      if (req.query.tx === "1") {
        await reg.withTransaction(async (s) => {
          seen.push(s);
          await s.getRepository(Note).save({ body: `request ${own.id}` });
          seen.push(currentSession(reg));
        });
      }
      await new Promise((resolve) => setImmediate(resolve));
      seen.push(currentSession(reg));
      sightings.set(own.id, seen);
      res.json({ session: own.id });
    });
    const port = await serve();
    const replies = await Promise.all(
      Array.from({ length: 200 }, (_, i) => send(port, `/who?tx=${i % 3 === 0 ? 1 : 0}`)),
    );
    await idle(reg);
    const ids = replies.map((r) => (JSON.parse(r.body) as { session: number }).session);
    expect(replies.every((r) => r.status === 200)).to.equal(true);
    expect(new Set(ids).size).to.equal(200);
    for (const id of ids) {
      const seen = sightings.get(id)!;
      expect(seen.length).to.be.at.least(4);
      for (const s of seen) expect(s.id, `request of session ${id}`).to.equal(id);
    }
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(67);
    expect(reg.stats()).to.include({ active: 0, closed: reg.stats().opened });
  });

  it("handler errors reach Express's error middleware unchanged, inside the request's scope", async () => {
    const { log } = recordEvents(reg);
    const boom = new Error("boom");
    let handlerSession: number | undefined;
    let caught: unknown;
    let errorSession: number | undefined;
    app.post("/fails", async () => {
      await reg.withTransaction(async (s) => {
        handlerSession = s.id;
        await s.getRepository(Note).save({ body: "failed" });
        throw boom;
      });
    });
    const handler: ErrorRequestHandler = (error: unknown, _req, res, _next) => {
      caught = error;
      errorSession = tryCurrentSession(reg)?.id;
      res.status(418).json({ message: (error as Error).message });
    };
    app.use(handler);
    const port = await serve();
    expect(await send(port, "/fails", { method: "POST" })).to.deep.equal({ status: 418, body: '{"message":"boom"}' });
    expect(caught).to.equal(boom);
    expect(errorSession).to.equal(handlerSession);
    await idle(reg);
    expect(log).to.include(`rollback#${handlerSession}`);
    expect(await count("failed")).to.equal(0);
  });

  it("errors thrown synchronously or rejected, with a status, reach Express's default handler with that status", async () => {
    app.get("/sync", () => {
      throw Object.assign(new Error("conflict"), { status: 409 });
    });
    app.get("/async", async () => {
      await currentSession(reg).query("SELECT 1");
      throw Object.assign(new Error("gone"), { status: 410 });
    });
    const port = await serve();
    expect((await send(port, "/sync")).status).to.equal(409);
    expect((await send(port, "/async")).status).to.equal(410);
    await idle(reg);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a route handler wrapped in reg.withSession works without the middleware", async () => {
    const bare = express();
    bare.get("/direct", (_req, res) =>
      reg.withSession(async (s) => {
        const notes = await s.getRepository(Note).count();
        res.json({ session: s.id, current: currentSession(reg) === s, notes });
      }),
    );
    bare.get("/outside", (_req, res) => {
      res.json({
        noScope: (() => {
          try {
            currentSession(reg);
            return false;
          } catch (error) {
            return error instanceof NoActiveSessionError;
          }
        })(),
      });
    });
    server = await listen(bare);
    const reply = await send(server.port, "/direct");
    expect(reply.status).to.equal(200);
    expect(JSON.parse(reply.body)).to.include({ current: true, notes: 0 });
    expect(JSON.parse((await send(server.port, "/outside")).body)).to.deep.equal({ noScope: true });
    expect(reg.stats()).to.include({ active: 0, opened: 1, closed: 1 });
  });
});

describe("express: sessionMiddleware options and setup", () => {
  it("rejects invalid options with a TypeError naming them", () => {
    expect(() => sessionMiddleware({ registry: {} as SessionRegistry })).to.throw(TypeError, /`registry`/);
    expect(() => sessionMiddleware(null as never)).to.throw(TypeError, /options of sessionMiddleware/);
  });

  it("passes RegistryNotConfiguredError to Express's error handling while the registry has no data source", async () => {
    const reg = createSessionRegistry({ name: "unconfigured" });
    const app = express();
    let caught: unknown;
    app.use(sessionMiddleware({ registry: reg }));
    app.get("/", (_req, res) => {
      res.end("unreachable");
    });
    app.use(((error: unknown, _req, res, _next) => {
      caught = error;
      res.status(503).end();
    }) satisfies ErrorRequestHandler);
    const server = await listen(app);
    try {
      expect((await send(server.port, "/")).status).to.equal(503);
      expect(caught).to.be.instanceOf(RegistryNotConfiguredError);
    } finally {
      await server.close();
    }
  });
});

describe("examples/express-app", () => {
  it("serves todos from its own registry on in-memory SQLite, one session per request", async () => {
    const registry = createExampleRegistry();
    const { server, url } = await startExample(registry);
    const port = Number(new URL(url).port);
    try {
      expect(JSON.parse((await send(port, "/health")).body)).to.include({ ok: true });
      expect(registry.stats().opened).to.equal(0);
      const created = await send(port, "/todos", { method: "POST", json: { title: "milk" } });
      expect(created.status).to.equal(201);
      const { id } = JSON.parse(created.body) as { id: number };
      expect((await send(port, `/todos/${id}/done`, { method: "POST" })).status).to.equal(200);
      const list = JSON.parse((await send(port, "/todos")).body) as { title: string; done: boolean }[];
      expect(list).to.deep.equal([{ id, title: "milk", done: true }]);
      expect((await send(port, "/todos/999")).status).to.equal(404);
      expect((await send(port, "/todos", { method: "POST", json: {} })).status).to.equal(400);
      await idle(registry);
      expect(registry.stats()).to.include({ active: 0, commits: 2 });
    } finally {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
      await registry.drain({ destroy: true });
    }
  });
});
