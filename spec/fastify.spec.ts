import { once } from "node:events";
import type { ClientRequest } from "node:http";
import type { AddressInfo } from "node:net";
import { expect } from "chai";
import Fastify, { type FastifyInstance } from "fastify";
import {
  currentSession,
  RegistryClosedError,
  type Session,
  type SessionRegistry,
  tryCurrentSession,
} from "../src/index.js";
import { fastifySession } from "../src/integrations/fastify.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { idle, send, within } from "./support/http.js";
import { deferred, recordEvents } from "./support/util.js";

forEachBackend("fastify: fastifySession", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  let app: FastifyInstance;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    app = Fastify();
    await app.register(fastifySession, { registry: reg });
  });
  afterEach(async () => {
    await app.close();
    await db.dispose();
  });

  const serve = async (): Promise<number> => {
    await app.listen({ port: 0, host: "127.0.0.1" });
    return (app.server.address() as AddressInfo).port;
  };
  const count = (body: string) => reg.withSession((s) => s.getRepository(Note).countBy({ body }));
  const json = <T>(body: string) => JSON.parse(body) as T;

  it("gives the handler and the later hooks the request's session, also after parsing a JSON body", async () => {
    const seen: Record<string, number | undefined> = {};
    app.addHook("preHandler", (req, _reply, done) => {
      seen[`preHandler ${req.method}`] = currentSession(reg).id; // creates the request's session
      done();
    });
    app.addHook("onSend", (req, _reply, payload, done) => {
      seen[`onSend ${req.method}`] = tryCurrentSession(reg)?.id;
      done(null, payload);
    });
    app.get("/notes", async () => ({ session: currentSession(reg).id, n: await reg.getRepository(Note).count() }));
    app.post<{ Body: { body: string } }>("/notes", async (req) => {
      const note = await reg.getRepository(Note).save({ body: req.body.body });
      return { session: currentSession(reg).id, id: note.id };
    });
    const port = await serve();
    const get = json<{ session: number; n: number }>((await send(port, "/notes")).body);
    const post = json<{ session: number }>((await send(port, "/notes", { method: "POST", json: { body: "x" } })).body);
    expect(seen).to.deep.equal({
      "preHandler GET": get.session,
      "onSend GET": get.session,
      "preHandler POST": post.session,
      "onSend POST": post.session,
    });
    expect(get.session).to.not.equal(post.session);
    await idle(reg);
    expect(await count("x")).to.equal(1);
  });

  it("two concurrent requests see different sessions, each its own across awaits", async () => {
    const both = deferred();
    let arrived = 0;
    app.get("/who", async () => {
      const own = currentSession(reg);
      await own.query("SELECT 1");
      if (++arrived === 2) both.resolve();
      await both.promise; // both requests are in their handlers at once
      await new Promise((resolve) => setTimeout(resolve, 1));
      return { before: own.id, after: currentSession(reg).id };
    });
    const port = await serve();
    const replies = await Promise.all([send(port, "/who"), send(port, "/who")]);
    const [a, b] = replies.map((r) => json<{ before: number; after: number }>(r.body));
    expect(a!.before).to.equal(a!.after);
    expect(b!.before).to.equal(b!.after);
    expect(a!.before).to.not.equal(b!.before);
    await idle(reg);
    expect(reg.stats()).to.include({ active: 0, opened: 2, closed: 2 });
  });

  it("covers routes of plugins registered after it (not encapsulated)", async () => {
    await app.register(async (child) => {
      child.get("/child", async () => ({
        session: tryCurrentSession(reg)?.id ?? null,
        current: !!currentSession(reg),
      }));
    });
    const port = await serve();
    const reply = json<{ session: number | null; current: boolean }>((await send(port, "/child")).body);
    expect(reply.current).to.equal(true);
    expect(reply.session).to.equal(null); // created on first use, not by the plugin
  });

  it("a route's withTransaction commits, and rolls back when its body throws", async () => {
    const { log } = recordEvents(reg);
    app.post("/ok", () =>
      reg.withTransaction(async (s) => ({ id: (await s.getRepository(Note).save({ body: "kept" })).id })),
    );
    app.post("/fail", async (_req, reply) => {
      try {
        await reg.withTransaction(async (s) => {
          await s.getRepository(Note).save({ body: "undone" });
          throw new Error("no");
        });
      } catch {
        return reply.code(422).send({ undone: true });
      }
    });
    const port = await serve();
    expect((await send(port, "/ok", { method: "POST" })).status).to.equal(200);
    expect(await send(port, "/fail", { method: "POST" })).to.deep.equal({ status: 422, body: '{"undone":true}' });
    await idle(reg);
    expect(await count("kept")).to.equal(1);
    expect(await count("undone")).to.equal(0);
    expect(log.filter((e) => e.startsWith("commit#")).length).to.be.at.least(1);
    expect(log.filter((e) => e.startsWith("rollback#")).length).to.equal(1);
  });

  it("errors of a route keep Fastify's error handling: statusCode, and setErrorHandler inside the scope", async () => {
    app.get("/conflict", async () => {
      await currentSession(reg).query("SELECT 1");
      throw Object.assign(new Error("taken"), { statusCode: 409 });
    });
    const port = await serve();
    const reply = await send(port, "/conflict");
    expect(reply.status).to.equal(409);
    expect(json<{ message: string }>(reply.body).message).to.equal("taken");
    await app.close();

    app = Fastify();
    await app.register(fastifySession, { registry: reg });
    let handlerSession: number | undefined;
    let errorSession: number | undefined;
    app.get("/boom", () => {
      handlerSession = currentSession(reg).id;
      throw new Error("boom");
    });
    app.setErrorHandler((error: Error, _req, reply) => {
      errorSession = tryCurrentSession(reg)?.id;
      return reply.code(418).send({ message: error.message });
    });
    const other = await serve();
    expect(await send(other, "/boom")).to.deep.equal({ status: 418, body: '{"message":"boom"}' });
    expect(errorSession).to.be.a("number").and.to.equal(handlerSession);
    await idle(reg);
  });

  it("a client that goes away mid-request crashes nothing and leaks nothing; the running block ends as its body says", async () => {
    const { log } = recordEvents(reg);
    const inserted = deferred<number>();
    const finished = deferred<unknown>();
    app.post("/slow", async (req) => {
      const gone = once(req.raw.socket, "close");
      const outcome = reg
        .withTransaction(async (s) => {
          await s.getRepository(Note).save({ body: "aborted" });
          inserted.resolve(s.id);
          await gone; // the client went away while the block runs
          if (req.raw.socket.destroyed) throw new Error("client went away");
          await s.getRepository(Note).save({ body: "never" });
        })
        .catch((error: unknown) => error);
      finished.resolve(await outcome);
      return {};
    });
    const port = await serve();
    let client: ClientRequest | undefined;
    const reply = send(port, "/slow", { method: "POST", sent: (r) => (client = r) }).catch((e: unknown) => e);
    const session = await within(inserted.promise, "the handler to insert its row");
    client!.destroy();
    expect(await reply).to.be.an("error"); // socket hang up
    expect(await within(finished.promise, "the block to settle")).to.have.property("message", "client went away");
    await idle(reg);
    expect(log).to.include.members([`rollback#${session}`, `close#${session}`]);
    expect(log).to.not.include(`commit#${session}`);
    expect(await count("aborted")).to.equal(0);
    expect(reg.stats().active).to.equal(0);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("work done after the reply was sent runs in a session of its own, which commits and closes", async () => {
    const done = deferred<{ before: Session; after: Session }>();
    app.post("/later", (_req, reply) => {
      const before = currentSession(reg);
      void reply.send({ accepted: true });
      void (async () => {
        await once(reply.raw, "finish"); // the request is over
        const after = await reg.withTransaction(async (s) => {
          await s.getRepository(Note).save({ body: "after the response" });
          return s;
        });
        done.resolve({ before, after });
      })();
    });
    const port = await serve();
    expect(await send(port, "/later", { method: "POST" })).to.deep.equal({ status: 200, body: '{"accepted":true}' });
    const { before, after } = await within(done.promise, "the work after the response");
    expect(after).to.not.equal(before);
    expect(before.closed).to.equal(true);
    await idle(reg);
    expect(await count("after the response")).to.equal(1);
    expect(reg.stats().active).to.equal(0);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a draining registry: each request goes to Fastify's error handler with RegistryClosedError", async () => {
    let caught: unknown;
    let reached = false;
    app.get("/any", () => {
      reached = true;
      return {};
    });
    app.setErrorHandler((error, _req, reply) => {
      caught = error;
      return reply.code(503).send({ code: (error as RegistryClosedError).code });
    });
    const port = await serve();
    expect((await send(port, "/any")).status).to.equal(200);
    reached = false;
    await reg.drain();
    expect(await send(port, "/any")).to.deep.equal({ status: 503, body: '{"code":"ERR_REGISTRY_CLOSED"}' });
    expect(caught).to.be.instanceOf(RegistryClosedError);
    expect(reached).to.equal(false);
  });
});

describe("fastify: fastifySession options", () => {
  it("rejects a registry that is not a SessionRegistry when the app loads", async () => {
    const app = Fastify();
    try {
      await app.register(fastifySession, { registry: {} as SessionRegistry });
      expect.fail("register() should have rejected");
    } catch (error) {
      expect(error).to.be.instanceOf(TypeError);
      expect((error as Error).message).to.match(/registry.*SessionRegistry/);
    } finally {
      await app.close();
    }
  });
});
