// The request's scope ends when the handler's work ends, on real Express 4 and 5 servers with
// real sockets that the client destroys mid-request: no crash, no half commit, no leak.
import type { ClientRequest } from "node:http";
import { createRequire } from "node:module";
import { expect } from "chai";
import express, { type Express } from "express";
import Koa from "koa";
import type { DataSource } from "typeorm";
import { currentSession, type SessionRegistry } from "../src/index.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { koaSession } from "../src/integrations/koa.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { idle, listen, send, within } from "./support/http.js";
import { deferred } from "./support/util.js";

// Express 4 is installed under an alias; its API for what is used here is Express 5's.
const express4 = createRequire(import.meta.url)("express4") as typeof express;

const VERSIONS = [
  { name: "Express 4", make: (): Express => express4() },
  { name: "Express 5", make: (): Express => express() },
];

/** Every unhandled rejection and uncaught exception while a test runs: each would end a real app. */
function watchCrashes(): { crashes: unknown[]; stop: () => void } {
  const crashes: unknown[] = [];
  const record = (error: unknown): void => void crashes.push(error);
  process.on("unhandledRejection", record);
  process.on("uncaughtException", record);
  return {
    crashes,
    stop: () => {
      process.off("unhandledRejection", record);
      process.off("uncaughtException", record);
    },
  };
}

/** Connections of this database's that sit in an open transaction (PostgreSQL), seen from outside. */
async function idleInTransaction(observer: DataSource): Promise<number> {
  const rows = await observer.query<{ n: number }[]>(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
  );
  return rows[0]!.n;
}

forEachBackend("request lifetime", (backend: Backend) => {
  for (const version of VERSIONS) {
    describe(version.name, () => {
      let db: TestDb;
      let reg: SessionRegistry;
      let observer: DataSource;
      let app: Express;
      let server: { port: number; close: () => Promise<void> } | undefined;
      let watch: ReturnType<typeof watchCrashes>;
      beforeEach(async () => {
        db = await backend.open();
        reg = db.registry();
        observer = db.dataSource();
        app = version.make();
        app.set("env", "test");
        app.use(sessionMiddleware({ registry: reg }));
        app.get("/count/:body", async (req, res) => {
          res.json({ count: await reg.getRepository(Note).countBy({ body: req.params.body }) });
        });
        watch = watchCrashes();
      });
      afterEach(async () => {
        watch.stop();
        await server?.close();
        server = undefined;
        await db.dispose();
      });

      const serve = async (): Promise<number> => {
        server = await listen(app);
        return server.port;
      };
      /** Rows with `body`, read on a connection of its own, after everything else. */
      const rows = async (body: string): Promise<number> => {
        if (!observer.isInitialized) await observer.initialize();
        return observer.getRepository(Note).countBy({ body });
      };
      /** No session open, no connection checked out, nothing left in a transaction. */
      const nothingLeaked = async (): Promise<void> => {
        await idle(reg);
        expect(reg.stats().active).to.equal(0);
        expect(connectionsInUse(reg.dataSource!)).to.equal(0);
        if (backend.kind === "postgres") {
          if (!observer.isInitialized) await observer.initialize();
          expect(await idleInTransaction(observer)).to.equal(0);
        }
      };

      it("a client gone while an un-wrapped async handler's transaction runs: it commits whole, the handler goes on, no crash", async () => {
        const notes = reg.getRepository(Note);
        const inside = deferred();
        const gone = deferred();
        const handled = deferred<number>();
        // Un-wrapped: a rejection here would be unhandled under Express 4.
        app.post("/work", async (req, res) => {
          req.socket.on("close", () => gone.resolve());
          await reg.withTransaction(async () => {
            await notes.save({ body: "tx 1" });
            inside.resolve();
            await gone.promise; // the client has gone away; the block goes on
            await notes.save({ body: "tx 2" });
          });
          // After the request is over, the proxies work on a new session.
          await notes.save({ body: "after" });
          handled.resolve(await notes.countBy({ body: "tx 2" }));
          res.status(201).json({ ok: true });
        });
        const port = await serve();
        let client: ClientRequest | undefined;
        const reply = send(port, "/work", { method: "POST", sent: (req) => (client = req) }).catch((e: unknown) => e);
        await within(inside.promise, "the handler's transaction to start");
        client!.destroy();
        expect(await reply).to.be.an("error"); // socket hang up
        expect(await within(handled.promise, "the handler to finish")).to.equal(1);
        expect(await send(port, "/count/tx%201")).to.deep.equal({ status: 200, body: '{"count":1}' });
        await nothingLeaked();
        expect([await rows("tx 1"), await rows("tx 2"), await rows("after")]).to.deep.equal([1, 1, 1]);
        expect(watch.crashes).to.deep.equal([]);
      });

      it("a client gone while a statement of the request is in flight: the statement completes, the session closes after it", async function () {
        if (backend.kind !== "postgres") this.skip(); // pg_sleep: a statement that is surely in flight
        const notes = reg.getRepository(Note);
        const issued = deferred();
        const handled = deferred<unknown>();
        app.get("/slow", async (_req, res) => {
          const slow = reg.manager.query("SELECT pg_sleep(0.3)");
          issued.resolve();
          await slow;
          await notes.insert({ body: "after the sleep" });
          handled.resolve(await notes.countBy({ body: "after the sleep" }));
          res.end();
        });
        const port = await serve();
        let client: ClientRequest | undefined;
        const reply = send(port, "/slow", { sent: (req) => (client = req) }).catch((e: unknown) => e);
        await within(issued.promise, "the slow statement to be issued");
        client!.destroy();
        expect(await reply).to.be.an("error");
        expect(await within(handled.promise, "the handler to finish")).to.equal(1);
        expect((await send(port, "/count/x")).status).to.equal(200);
        await nothingLeaked();
        expect(watch.crashes).to.deep.equal([]);
      });

      it("a Session kept by an un-wrapped handler across the client's disconnect: its next statement runs, no crash", async () => {
        const waiting = deferred();
        const gone = deferred();
        const handled = deferred<number>();
        app.get("/kept", async (req, res) => {
          req.socket.on("close", () => gone.resolve());
          const s = currentSession(reg); // the most common way to hold the session
          await s.query("SELECT 1");
          waiting.resolve();
          await gone.promise; // e.g. a call to another service, during which the client leaves
          await s.getRepository(Note).insert({ body: "kept" });
          handled.resolve(await s.getRepository(Note).countBy({ body: "kept" }));
          res.end();
        });
        const port = await serve();
        let client: ClientRequest | undefined;
        const reply = send(port, "/kept", { sent: (req) => (client = req) }).catch((e: unknown) => e);
        await within(waiting.promise, "the handler's first statement");
        client!.destroy();
        expect(await reply).to.be.an("error");
        expect(await within(handled.promise, "the handler to finish")).to.equal(1);
        await nothingLeaked();
        expect(watch.crashes).to.deep.equal([]);
      });

      it("respond-then-continue: withTransaction that responds before its last statement commits both rows", async () => {
        const committed = deferred<number>();
        reg.on("commit", (e) => committed.resolve(e.session.id));
        let session: number | undefined;
        app.post("/items", async (_req, res) => {
          await reg.withTransaction(async (s) => {
            session = s.id;
            await s.getRepository(Note).save({ body: "a" });
            const finished = new Promise((resolve) => res.on("finish", resolve));
            res.status(201).json({ session: s.id });
            await finished; // the response is out: the request is over
            await s.getRepository(Note).save({ body: "b" });
          });
        });
        const port = await serve();
        const reply = await send(port, "/items", { method: "POST" });
        expect(reply.status).to.equal(201);
        expect(await within(committed.promise, "the transaction's COMMIT")).to.equal(session);
        expect([await rows("a"), await rows("b")]).to.deep.equal([1, 1]);
        await nothingLeaked();
        expect(watch.crashes).to.deep.equal([]);
      });

      it("50 requests whose clients hang up at every stage: each transaction is all or nothing, no crash, no leak", async () => {
        const notes = reg.getRepository(Note);
        const arrived = new Map<number, () => void>();
        app.post("/pair/:n", async (req, res) => {
          const n = Number(req.params.n);
          await notes.count();
          arrived.get(n)?.();
          await reg.withTransaction(async (s) => {
            await s.getRepository(Note).save({ body: `pair ${n}`, block: n });
            if (n % 2 === 0) await new Promise((resolve) => setImmediate(resolve));
            await notes.save({ body: `pair ${n}`, block: n });
          });
          res.json({ n });
        });
        const port = await serve();
        const clients = Array.from({ length: 50 }, (_, n) => {
          const there = deferred();
          arrived.set(n, there.resolve);
          let client: ClientRequest | undefined;
          const reply = send(port, `/pair/${n}`, { method: "POST", sent: (req) => (client = req) }).catch(
            (e: unknown) => e,
          );
          // A third hang up at once, a third once the handler runs, a third wait for the reply.
          if (n % 3 === 0) client!.destroy();
          else if (n % 3 === 1) void there.promise.then(() => client!.destroy());
          return reply;
        });
        await within(Promise.all(clients), "every client to finish or hang up", 30_000);
        expect((await send(port, "/count/x")).status).to.equal(200);
        await nothingLeaked();
        for (let n = 0; n < 50; n++) {
          const pair = await rows(`pair ${n}`);
          expect([0, 2], `rows of request ${n}`).to.include(pair);
          if (n % 3 !== 0) expect(pair, `rows of request ${n}, whose handler ran`).to.equal(2);
        }
        expect(watch.crashes).to.deep.equal([]);
      });
    });
  }

  describe("Koa", () => {
    let db: TestDb;
    let reg: SessionRegistry;
    let server: { port: number; close: () => Promise<void> } | undefined;
    let watch: ReturnType<typeof watchCrashes>;
    beforeEach(async () => {
      db = await backend.open();
      reg = db.registry();
      watch = watchCrashes();
    });
    afterEach(async () => {
      watch.stop();
      await server?.close();
      server = undefined;
      await db.dispose();
    });

    it("a client gone while downstream's transaction runs: it commits whole, downstream goes on, no crash, no leak", async () => {
      const notes = reg.getRepository(Note);
      const inside = deferred();
      const gone = deferred();
      const handled = deferred<number>();
      const app = new Koa();
      app.silent = true;
      app.use(koaSession({ registry: reg }));
      app.use(async (ctx) => {
        if (ctx.path === "/count") {
          ctx.body = { count: await notes.count() };
          return;
        }
        ctx.req.socket.on("close", () => gone.resolve());
        await reg.withTransaction(async () => {
          await notes.save({ body: "koa 1" });
          inside.resolve();
          await gone.promise;
          await notes.save({ body: "koa 2" });
        });
        await notes.save({ body: "koa after" });
        handled.resolve(await notes.countBy({ body: "koa 2" }));
        ctx.body = { ok: true };
      });
      server = await listen(app.callback());
      let client: ClientRequest | undefined;
      const reply = send(server.port, "/work", { method: "POST", sent: (req) => (client = req) }).catch(
        (e: unknown) => e,
      );
      await within(inside.promise, "downstream's transaction to start");
      client!.destroy();
      expect(await reply).to.be.an("error");
      expect(await within(handled.promise, "downstream to finish")).to.equal(1);
      expect(await send(server.port, "/count")).to.deep.equal({ status: 200, body: '{"count":3}' });
      await idle(reg);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      expect(watch.crashes).to.deep.equal([]);
    });
  });
});
