// Guarantee 11: once drain() has begun (while a block still runs, so the drain is pending),
// every way of starting work on the registry rejects with RegistryClosedError and runs no body.
import { expect } from "chai";
import express, { type ErrorRequestHandler } from "express";
import Koa from "koa";
import type { TaskContext } from "node-cron";
import {
  type DrainResult,
  openSession,
  RegistryClosedError,
  type SessionRegistry,
  Transactional,
  UsesSession,
  withSession,
  withTransaction,
} from "../src/index.js";
import { sessionTask } from "../src/integrations/cron.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { koaSession } from "../src/integrations/koa.js";
import { type Backend, forEachBackend, type TestDb } from "./support/backends.js";
import { listen, send, within } from "./support/http.js";
import { deferred, rejectionOf } from "./support/util.js";

forEachBackend("drain: every entry point refuses work once drain() has begun", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  let release: () => void;
  let running: Promise<unknown>;
  let draining: Promise<DrainResult>;
  /** Bodies that ran: must stay empty. */
  let ran: string[];

  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    ran = [];
    const gate = deferred();
    const inside = deferred();
    release = () => gate.resolve();
    running = reg.withTransaction(async (s) => {
      await s.query("SELECT 1");
      inside.resolve();
      await gate.promise;
    });
    await within(inside.promise, "the running block to start");
    draining = reg.drain();
  });
  afterEach(async () => {
    release();
    await running;
    expect(await within(draining, "drain() to finish")).to.deep.equal({ waited: 1, forced: 0 });
    await db.dispose();
  });

  /** Assert `promise` rejects with RegistryClosedError and that nothing ran. */
  const refused = async (promise: Promise<unknown>): Promise<void> => {
    const error = await rejectionOf(promise);
    expect(error).to.be.instanceOf(RegistryClosedError);
    expect(error).to.include({ code: "ERR_REGISTRY_CLOSED", registryName: reg.name });
    expect(ran).to.deep.equal([]);
  };

  it("withSession and withTransaction, bound and bare", async () => {
    await refused(reg.withSession(() => ran.push("reg.withSession")));
    await refused(reg.withTransaction(() => ran.push("reg.withTransaction")));
    await refused(withSession(() => ran.push("withSession"), { registry: reg }));
    await refused(withTransaction(() => ran.push("withTransaction"), { registry: reg }));
  });

  it("registry.scope() and registry.detached()", async () => {
    await refused(reg.scope(() => ran.push("scope")));
    await refused(reg.open());
    await refused(openSession({ registry: reg }));
    await refused(reg.detached(() => ran.push("detached")));
  });

  it("@UsesSession and @Transactional methods", async () => {
    const registry = reg;
    class Job {
      @UsesSession({ registry })
      async plain(): Promise<void> {
        ran.push("@UsesSession");
      }

      @Transactional({ registry })
      async transactional(): Promise<void> {
        ran.push("@Transactional");
      }
    }
    const job = new Job();
    await refused(job.plain());
    await refused(job.transactional());
  });

  it("the express middleware: the request's error reaches Express's error handler, no handler runs", async () => {
    const app = express();
    let caught: unknown;
    app.use(sessionMiddleware({ registry: reg }));
    app.get("/", (_req, res) => {
      ran.push("express handler");
      res.end();
    });
    app.use(((error: unknown, _req, res, _next) => {
      caught = error;
      res.status(503).end();
    }) satisfies ErrorRequestHandler);
    const server = await listen(app);
    try {
      expect((await send(server.port, "/")).status).to.equal(503);
    } finally {
      await server.close();
    }
    await refused(Promise.reject(caught));
  });

  it("the koa middleware: the request's error reaches Koa's error handling, downstream does not run", async () => {
    const app = new Koa();
    app.silent = true;
    const emitted: unknown[] = [];
    app.on("error", (error: unknown) => emitted.push(error));
    app.use(koaSession({ registry: reg }));
    app.use((ctx) => {
      ran.push("koa downstream");
      ctx.body = "unreachable";
    });
    const server = await listen(app.callback());
    try {
      expect((await send(server.port, "/")).status).to.equal(500);
    } finally {
      await server.close();
    }
    expect(emitted).to.have.lengthOf(1);
    await refused(Promise.reject(emitted[0]));
  });

  it("a cron sessionTask tick", async () => {
    const tick = sessionTask(() => void ran.push("cron tick"), { registry: reg });
    const context: TaskContext = { date: new Date(), dateLocalIso: new Date().toISOString(), triggeredAt: new Date() };
    await refused(tick(context));
  });
});
