import type { ClientRequest } from "node:http";
import { expect } from "chai";
import Koa, { type Middleware } from "koa";
import {
  createSessionRegistry,
  currentSession,
  NoActiveSessionError,
  RegistryNotConfiguredError,
  type Session,
  type SessionRegistry,
  tryCurrentSession,
} from "../src/index.js";
import { koaSession } from "../src/integrations/koa.js";
import { createRegistry as createExampleRegistry, start as startExample } from "../examples/koa-app.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { idle, listen, send, within } from "./support/http.js";
import { deferred, recordEvents, turns } from "./support/util.js";

forEachBackend("koa: koaSession", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  let server: { port: number; close: () => Promise<void> } | undefined;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
  });
  afterEach(async () => {
    await server?.close();
    server = undefined;
    await db.dispose();
  });

  /** Serve `handler` behind koaSession, with `upstream` (if any) in front of it. */
  const serve = async (handler: Middleware, upstream?: Middleware): Promise<number> => {
    const app = new Koa();
    app.silent = true;
    if (upstream !== undefined) app.use(upstream);
    app.use(koaSession({ registry: reg }));
    app.use(handler);
    server = await listen(app.callback());
    return server.port;
  };
  const count = (body: string) => reg.withSession((s) => s.getRepository(Note).countBy({ body }));

  it("a request that never touches the database opens no session and takes no connection", async () => {
    const { log } = recordEvents(reg);
    const port = await serve(async (ctx) => {
      // Asking for the session creates it, but only a statement takes a connection.
      ctx.body = { session: ctx.path === "/looks" ? currentSession(reg).id : (tryCurrentSession(reg)?.id ?? null) };
    });
    expect(await send(port, "/pure")).to.deep.equal({ status: 200, body: '{"session":null}' });
    expect(log).to.deep.equal([]);
    const { session } = JSON.parse((await send(port, "/looks")).body) as { session: number };
    await idle(reg);
    expect(log).to.deep.equal([`open#${session}`, `close#${session}`]);
  });

  it("closes the request's session before Koa sends the response: close event, stats().active 0, released", async () => {
    const { log } = recordEvents(reg);
    const port = await serve(async (ctx) => {
      const s = currentSession(reg);
      ctx.body = { session: s.id, notes: await s.getRepository(Note).count() };
    });
    const replies = [await send(port, "/"), await send(port, "/")];
    // No wait needed: the scope ends when downstream settles, before the response is written.
    expect(reg.stats()).to.include({ active: 0, opened: 2, closed: 2 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    const ids = replies.map((r) => (JSON.parse(r.body) as { session: number }).session);
    expect(replies.map((r) => r.status)).to.deep.equal([200, 200]);
    expect(ids[0]).to.not.equal(ids[1]);
    for (const id of ids) expect(log).to.include.members([`open#${id}`, `connect#${id}`, `close#${id}`]);
  });

  it("a block downstream left running ends as its body says after downstream settles, then the session closes", async () => {
    const { log } = recordEvents(reg);
    const committed = deferred<number>();
    reg.on("commit", (e) => committed.resolve(e.session.id));
    const settled = deferred();
    const port = await serve(async (ctx) => {
      // Started and not awaited: it outlives downstream, which settles first.
      void reg.withTransaction(async (s) => {
        await s.getRepository(Note).save({ body: "later 1" });
        await settled.promise;
        await s.getRepository(Note).save({ body: "later 2" });
      });
      ctx.body = { session: currentSession(reg).id };
      ctx.res.on("finish", () => settled.resolve());
    });
    const reply = await send(port, "/", { method: "POST" });
    const { session } = JSON.parse(reply.body) as { session: number };
    expect(await within(committed.promise, "the block's COMMIT")).to.equal(session);
    await idle(reg);
    expect(log).to.include.members([`begin#${session}`, `commit#${session}`, `close#${session}`]);
    expect(await count("later 1")).to.equal(1);
    expect(await count("later 2")).to.equal(1);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a Session kept past a client's disconnect works again (and closes again); the proxies go on with a new session", async () => {
    const { log } = recordEvents(reg);
    const first = deferred<number>();
    const after = deferred<{ kept: unknown; count: number; session: number }>();
    const port = await serve(async (ctx) => {
      const s = currentSession(reg);
      await s.query("SELECT 1");
      first.resolve(s.id);
      await new Promise((resolve) => s.signal.addEventListener("abort", resolve, { once: true }));
      const kept = await s.query<unknown>("SELECT 1").catch((error: unknown) => error);
      const notes = await reg.getRepository(Note).count();
      after.resolve({ kept, count: notes, session: currentSession(reg).id });
      ctx.body = "too late";
    });
    let client: ClientRequest | undefined;
    const reply = send(port, "/", { sent: (req) => (client = req) }).catch((e: unknown) => e);
    const session = await within(first.promise, "downstream's first statement");
    client!.destroy();
    expect(await reply).to.be.an("error"); // socket hang up
    const seen = await within(after.promise, "downstream to go on");
    expect(seen.kept).to.have.length(1);
    expect(seen.count).to.equal(0);
    expect(seen.session).to.not.equal(session);
    await idle(reg);
    expect(log).to.include.members([`close#${session}`, `open#${seen.session}`, `close#${seen.session}`]);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("200 concurrent requests each see only their own session across awaits, timers and queries", async () => {
    const sightings = new Map<number, Session[]>();
    const port = await serve(async (ctx) => {
      const own = currentSession(reg);
      const seen: Session[] = [];
      await turns(1);
      seen.push(currentSession(reg));
      await own.query("SELECT 1");
      seen.push(currentSession(reg));
      await new Promise((resolve) => setTimeout(resolve, 1));
      seen.push(currentSession(reg));
      if (ctx.query.tx === "1") {
        await reg.withTransaction(async (s) => {
          seen.push(s);
          await s.getRepository(Note).save({ body: `request ${own.id}` });
          seen.push(currentSession(reg));
        });
      }
      await new Promise((resolve) => setImmediate(resolve));
      seen.push(currentSession(reg));
      sightings.set(own.id, seen);
      ctx.body = { session: own.id };
    });
    const replies = await Promise.all(Array.from({ length: 200 }, (_, i) => send(port, `/?tx=${i % 3 === 0 ? 1 : 0}`)));
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

  it("downstream errors reach upstream middleware unchanged, after the rollback", async () => {
    const { log } = recordEvents(reg);
    const boom = new Error("boom");
    let handlerSession: number | undefined;
    let caught: unknown;
    let activeWhenCaught: number | undefined;
    const port = await serve(
      () =>
        reg.withTransaction(async (s) => {
          handlerSession = s.id;
          await s.getRepository(Note).save({ body: "failed" });
          throw boom;
        }),
      async (ctx, next) => {
        try {
          await next();
        } catch (error) {
          caught = error;
          activeWhenCaught = reg.stats().active;
          ctx.status = 418;
          ctx.body = { message: (error as Error).message };
        }
      },
    );
    expect(await send(port, "/", { method: "POST" })).to.deep.equal({ status: 418, body: '{"message":"boom"}' });
    expect(caught).to.equal(boom);
    expect(activeWhenCaught).to.equal(0);
    expect(log).to.include(`rollback#${handlerSession}`);
    expect(await count("failed")).to.equal(0);
  });

  it("uncaught errors reach Koa's error handling unchanged: the app's error event and the error's status", async () => {
    const conflict = Object.assign(new Error("conflict"), { status: 409, expose: true });
    const app = new Koa();
    const emitted: unknown[] = [];
    app.on("error", (error: unknown) => emitted.push(error));
    app.use(koaSession({ registry: reg }));
    app.use(async () => {
      await currentSession(reg).query("SELECT 1");
      throw conflict;
    });
    server = await listen(app.callback());
    expect(await send(server.port, "/")).to.deep.equal({ status: 409, body: "conflict" });
    expect(emitted).to.deep.equal([conflict]);
    expect(emitted[0]).to.equal(conflict);
    expect(reg.stats().active).to.equal(0);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a handler wrapped in reg.withSession works without the middleware", async () => {
    const app = new Koa();
    app.use(async (ctx) => {
      if (ctx.path === "/outside") {
        ctx.body = { session: tryCurrentSession(reg) ?? null, throws: noScope(() => currentSession(reg)) };
        return;
      }
      ctx.body = await reg.withSession(async (s) => ({
        session: s.id,
        current: currentSession(reg) === s,
        notes: await s.getRepository(Note).count(),
      }));
    });
    server = await listen(app.callback());
    const reply = await send(server.port, "/direct");
    expect(reply.status).to.equal(200);
    expect(JSON.parse(reply.body)).to.include({ current: true, notes: 0 });
    expect(JSON.parse((await send(server.port, "/outside")).body)).to.deep.equal({ session: null, throws: true });
    expect(reg.stats()).to.include({ active: 0, opened: 1, closed: 1 });
  });
});

/** Whether `fn` throws NoActiveSessionError. */
function noScope(fn: () => unknown): boolean {
  try {
    fn();
    return false;
  } catch (error) {
    return error instanceof NoActiveSessionError;
  }
}

describe("koa: koaSession options and setup", () => {
  it("rejects invalid options with a TypeError naming them", () => {
    expect(() => koaSession({ registry: {} as SessionRegistry })).to.throw(TypeError, /`registry`/);
    expect(() => koaSession(null as never)).to.throw(TypeError, /options of koaSession/);
  });

  it("rejects with RegistryNotConfiguredError, to Koa's error handling, while the registry has no data source", async () => {
    const reg = createSessionRegistry({ name: "unconfigured" });
    const app = new Koa();
    const emitted: unknown[] = [];
    app.on("error", (error: unknown) => emitted.push(error));
    app.use(koaSession({ registry: reg }));
    app.use((ctx) => {
      ctx.body = "unreachable";
    });
    const server = await listen(app.callback());
    try {
      expect((await send(server.port, "/")).status).to.equal(500);
      expect(emitted).to.have.length(1);
      expect(emitted[0]).to.be.instanceOf(RegistryNotConfiguredError);
    } finally {
      await server.close();
    }
  });
});

describe("examples/koa-app", () => {
  it("serves todos from its own registry on in-memory SQLite, one session per request", async () => {
    const registry = createExampleRegistry();
    const { server, url } = await startExample(registry);
    const port = Number(new URL(url).port);
    try {
      expect(JSON.parse((await send(port, "/health")).body)).to.deep.equal({ ok: true });
      expect(registry.stats().opened).to.equal(0);
      const created = await send(port, "/todos", { method: "POST", json: { title: "milk" } });
      expect(created.status).to.equal(201);
      const { id } = JSON.parse(created.body) as { id: number };
      const list = JSON.parse((await send(port, "/todos")).body) as { id: number; title: string }[];
      expect(list).to.deep.equal([{ id, title: "milk" }]);
      expect((await send(port, "/todos", { method: "POST", json: {} })).status).to.equal(400);
      await idle(registry);
      expect(registry.stats()).to.include({ active: 0, commits: 1 });
    } finally {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
      await registry.drain({ destroy: true });
    }
  });
});
