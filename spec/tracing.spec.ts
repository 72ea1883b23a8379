/**
 * The `tracing` registry option against the real OpenTelemetry SDK: spans per session,
 * transaction and savepoint, their events, statuses and attributes, statement spans of
 * the pg instrumentation (in a child process, see support/tracing-pg-worker.ts), request
 * sessions, the application's own spans, and nothing at all without an SDK.
 *
 * Every test that registers an SDK unregisters it afterwards (`trace`, `context` and
 * `propagation` disabled, provider shut down), so that no other spec file sees it.
 */
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { context, propagation, type Span, SpanStatusCode, trace } from "@opentelemetry/api";
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  type Sampler,
  SamplingDecision,
  SimpleSpanProcessor,
} from "@opentelemetry/sdk-trace-base";
import { NodeTracerProvider } from "@opentelemetry/sdk-trace-node";
import { expect } from "chai";
import express from "express";
import { DataSource, type DataSourceOptions } from "typeorm";
import {
  createSessionRegistry,
  currentSession,
  type Session,
  type SessionRegistry,
  type SessionRegistryOptions,
} from "../src/index.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { idle, listen, send, within } from "./support/http.js";
import { freshDatabase, pgServer } from "./support/postgres-hooks.js";
import { ENTITIES, sqliteOptions } from "./support/sqlite.js";
import type { FinishedSpan } from "./support/tracing-pg-worker.js";
import { deferred } from "./support/util.js";

class Boom extends Error {}

/** The tracer name of `tracing: true`. */
const LIBRARY_TRACER = "typeorm-scoped-session";

/** A database the suite runs on: what its spans must say, and DataSources on it. */
interface TracedDb {
  readonly system: string;
  readonly namespace: string;
  options(): DataSourceOptions;
  /** Make the current attempt fail with an error the default `retryOn` retries. */
  failRetryably(s: Session): Promise<never>;
}

const sqliteDb: TracedDb = {
  system: "sqlite",
  namespace: ":memory:",
  options: () => sqliteOptions(":memory:"),
  failRetryably: () =>
    // What node-sqlite3 and better-sqlite3 throw when another connection holds the lock.
    Promise.reject(Object.assign(new Error("SQLITE_BUSY: database is locked"), { code: "SQLITE_BUSY" })),
};

function pgDb(url: string): TracedDb {
  return {
    system: "postgresql",
    namespace: decodeURIComponent(new URL(url).pathname.slice(1)),
    options: () => ({ type: "postgres", url, entities: ENTITIES, synchronize: true, extra: { max: 5 } }),
    // A real serialization failure (SQLSTATE 40001) from the server, wrapped by TypeORM.
    failRetryably: async (s) => {
      await s.query(
        "DO $$ BEGIN RAISE EXCEPTION 'could not serialize' USING ERRCODE = 'serialization_failure'; END $$",
      );
      throw new Error("the server did not raise");
    },
  };
}

/** The SDK of one test: registered globally unless asked not to. */
interface Sdk {
  readonly exporter: InMemorySpanExporter;
  readonly provider: BasicTracerProvider;
}

let installed: Sdk | undefined;

/** NodeTracerProvider (with its AsyncLocalStorage context manager) and an in-memory exporter, registered. */
function registerSdk(sampler?: Sampler): Sdk {
  const exporter = new InMemorySpanExporter();
  const provider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)], sampler });
  provider.register();
  installed = { exporter, provider };
  return installed;
}

/** Leave the process as it was: no global SDK, context manager or propagator. */
async function unregisterSdk(): Promise<void> {
  trace.disable();
  context.disable();
  propagation.disable();
  const sdk = installed;
  installed = undefined;
  await sdk?.provider.shutdown();
}

const idOf = (span: ReadableSpan): string => span.spanContext().spanId;
const traceOf = (span: ReadableSpan): string => span.spanContext().traceId;
const parentOf = (span: ReadableSpan): string | undefined => span.parentSpanContext?.spanId;
const eventNames = (span: ReadableSpan): string[] => span.events.map((e) => e.name);
const event = (span: ReadableSpan, name: string) => span.events.find((e) => e.name === name);

/** The finished spans called `name`, in the order they ended. */
function named(exporter: InMemorySpanExporter, name: string): ReadableSpan[] {
  return exporter.getFinishedSpans().filter((s) => s.name === name);
}

/** The one finished span called `name`. */
function only(exporter: InMemorySpanExporter, name: string): ReadableSpan {
  const found = named(exporter, name);
  expect(
    found.map((s) => s.name),
    `spans called "${name}"`,
  ).to.have.length(1);
  return found[0]!;
}

/** The tests of one database (`db()` is called once the suite's `before` hooks ran). */
function suite(db: () => TracedDb): void {
  let sources: DataSource[] = [];

  /** A registry on a new DataSource with `options` (tracing among them). */
  const registry = (options: Partial<SessionRegistryOptions> = {}): SessionRegistry => {
    const dataSource = new DataSource(db().options());
    sources.push(dataSource);
    return createSessionRegistry({ name: "traced", dataSource, ...options });
  };

  afterEach(async () => {
    await unregisterSdk();
    for (const ds of sources) if (ds.isInitialized) await ds.destroy();
    sources = [];
  });

  describe("spans per session, transaction and savepoint", () => {
    it("session <name> with db.system, db.namespace, session.id and session.statements; transaction and savepoint nest under it, in one trace", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const closed: { id: number; statements: number }[] = [];
      reg.on("close", (e) => closed.push({ id: e.session.id, statements: e.statements! }));
      let id = -1;
      await reg.withTransaction(
        async (s) => {
          id = s.id;
          await s.query("SELECT 1");
          await reg.withTransaction(async (inner) => {
            await inner.query("SELECT 2");
            await inner.query("SELECT 3");
          });
        },
        { name: "checkout" },
      );
      expect(closed).to.deep.equal([{ id, statements: 3 }]);
      const session = only(exporter, "session checkout");
      expect(session.attributes).to.deep.equal({
        "db.system": db().system,
        "db.namespace": db().namespace,
        "session.id": id,
        "session.statements": 3,
      });
      expect(session.instrumentationScope.name).to.equal(LIBRARY_TRACER);
      expect(parentOf(session), "no span was active: the session's is a root").to.equal(undefined);
      const transaction = only(exporter, "transaction");
      const savepoint = only(exporter, "savepoint");
      expect(parentOf(transaction)).to.equal(idOf(session));
      expect(parentOf(savepoint)).to.equal(idOf(transaction));
      expect(new Set([session, transaction, savepoint].map(traceOf)).size).to.equal(1);
      expect(transaction.attributes, "no retry: no attempt").to.not.have.property("retry.attempt");
      // Innermost first: each ends before what holds it.
      expect(exporter.getFinishedSpans().map((s) => s.name)).to.deep.equal([
        "savepoint",
        "transaction",
        "session checkout",
      ]);
    });

    it('an unnamed session\'s span is "session", a child of the span active when the session was created', async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const id = await trace.getTracer("app").startActiveSpan("GET /orders", async (outer: Span) => {
        try {
          return await reg.withSession(async (s) => {
            await s.query("SELECT 1");
            return s.id;
          });
        } finally {
          outer.end();
        }
      });
      const session = only(exporter, "session");
      const outer = only(exporter, "GET /orders");
      expect(session.attributes).to.include({ "db.system": db().system, "session.id": id, "session.statements": 1 });
      expect(parentOf(session)).to.equal(idOf(outer));
      expect(traceOf(session)).to.equal(traceOf(outer));
      expect(named(exporter, "transaction"), "withSession opens no transaction").to.have.length(0);
    });
  });

  describe("rollback and errors", () => {
    it("a committed transaction: no rollback event, no error status", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      await reg.withTransaction((s) => s.query("SELECT 1"));
      for (const span of [only(exporter, "transaction"), only(exporter, "session")]) {
        expect(eventNames(span), span.name).to.deep.equal([]);
        expect(span.status.code, span.name).to.equal(SpanStatusCode.UNSET);
      }
    });

    it("a body that throws: the transaction gets a rollback event, status ERROR and the exception; the owned session's span gets ERROR too", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const boom = new Boom("out of stock");
      const failed = reg.withTransaction(async (s) => {
        await s.query("SELECT 1");
        throw boom;
      });
      expect(await failed.catch((e: unknown) => e)).to.equal(boom);
      const transaction = only(exporter, "transaction");
      expect(event(transaction, "rollback")?.attributes).to.deep.equal({ "exception.message": "out of stock" });
      expect(transaction.status).to.deep.equal({ code: SpanStatusCode.ERROR, message: "out of stock" });
      expect(event(transaction, "exception")?.attributes).to.include({ "exception.message": "out of stock" });
      const session = only(exporter, "session");
      expect(session.status.code).to.equal(SpanStatusCode.ERROR);
      expect(event(session, "exception")?.attributes).to.include({ "exception.message": "out of stock" });
    });

    it("a savepoint whose body throws, caught by the outer block: the savepoint rolls back with ERROR; the transaction and the session commit clean", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      await reg.withTransaction(async (s) => {
        await s.query("SELECT 1");
        await reg
          .withTransaction(async (inner) => {
            await inner.query("SELECT 2");
            throw new Boom("inner failed");
          })
          .catch((e: unknown) => expect(e).to.be.instanceOf(Boom));
      });
      const savepoint = only(exporter, "savepoint");
      expect(eventNames(savepoint)).to.include.members(["rollback", "exception"]);
      expect(event(savepoint, "rollback")?.attributes).to.deep.equal({ "exception.message": "inner failed" });
      expect(savepoint.status.code).to.equal(SpanStatusCode.ERROR);
      for (const span of [only(exporter, "transaction"), only(exporter, "session")]) {
        expect(eventNames(span), span.name).to.deep.equal([]);
        expect(span.status.code, span.name).to.equal(SpanStatusCode.UNSET);
      }
    });

    it("a rollback by hand, without an error: a rollback event with no exception, no error status", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      await reg.withSession(async (s) => {
        await s.begin();
        await s.query("SELECT 1");
        await s.rollback();
      });
      const transaction = only(exporter, "transaction");
      expect(eventNames(transaction)).to.deep.equal(["rollback"]);
      expect(event(transaction, "rollback")?.attributes ?? {}).to.deep.equal({});
      expect(transaction.status.code).to.equal(SpanStatusCode.UNSET);
      expect(parentOf(transaction)).to.equal(idOf(only(exporter, "session")));
    });
  });

  describe("sessions that fail from outside their body", () => {
    it("a block past its timeoutMs: the session's span and the transaction it rolled back get ERROR with the timeout", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const never = deferred();
      const failed = reg.withTransaction(
        async (s) => {
          await s.query("SELECT 1");
          await never.promise;
        },
        { name: "slow", timeoutMs: 50 },
      );
      const error = (await failed.catch((e: unknown) => e)) as Error;
      expect(error.name).to.equal("SessionTimeoutError");
      never.resolve();
      const session = only(exporter, "session slow");
      expect(session.status).to.deep.equal({ code: SpanStatusCode.ERROR, message: error.message });
      const transaction = only(exporter, "transaction");
      expect(transaction.status.code).to.equal(SpanStatusCode.ERROR);
      expect(event(transaction, "rollback")?.attributes).to.deep.equal({ "exception.message": error.message });
    });

    it("a block force-closed by drain(): its session's span gets ERROR", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const started = deferred();
      const never = deferred();
      const failed = reg.withTransaction(
        async (s) => {
          await s.query("SELECT 1");
          started.resolve();
          await never.promise;
        },
        { name: "stuck" },
      );
      await started.promise;
      const result = await reg.drain({ timeoutMs: 20 });
      expect(result.forced).to.equal(1);
      const error = await failed.catch((e: unknown) => e);
      expect(error).to.be.instanceOf(Error);
      never.resolve();
      expect(only(exporter, "session stuck").status.code).to.equal(SpanStatusCode.ERROR);
      expect(only(exporter, "transaction").status.code).to.equal(SpanStatusCode.ERROR);
    });

    it("a transaction rolled back instead of committed (an inner savepoint: false block failed, its error caught): ERROR", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const failed = reg.withTransaction(async () => {
        await reg
          .withTransaction(() => Promise.reject(new Boom("inner")), { savepoint: false, name: "inner" })
          .catch(() => {});
      });
      const error = (await failed.catch((e: unknown) => e)) as Error;
      expect(error.name).to.equal("PropagationError");
      const transaction = only(exporter, "transaction");
      expect(transaction.status).to.deep.equal({ code: SpanStatusCode.ERROR, message: error.message });
      expect(eventNames(transaction)).to.include("rollback");
    });
  });

  describe("sampling", () => {
    it("a session span the sampler drops still parents what runs in the session, so that it is dropped with it", async () => {
      // Drops session spans, samples every other root, and follows the parent's decision.
      const sampler: Sampler = {
        shouldSample: (ctx, _traceId, name) => {
          const parent = trace.getSpanContext(ctx);
          if (parent !== undefined) {
            return {
              decision: parent.traceFlags & 1 ? SamplingDecision.RECORD_AND_SAMPLED : SamplingDecision.NOT_RECORD,
            };
          }
          return {
            decision: name.startsWith("session") ? SamplingDecision.NOT_RECORD : SamplingDecision.RECORD_AND_SAMPLED,
          };
        },
        toString: () => "drop-sessions",
      };
      const { exporter } = registerSdk(sampler);
      const reg = registry({ tracing: true });
      await reg.withTransaction(async (s) => {
        await s.query("SELECT 1");
        trace.getTracer("app").startSpan("work", undefined, context.active()).end();
      });
      trace.getTracer("app").startSpan("root").end();
      expect(exporter.getFinishedSpans().map((span) => span.name)).to.deep.equal(["root"]);
    });
  });

  describe("retry", () => {
    it("attempt 1's transaction has retry.attempt 1 and ERROR; attempt 2's has retry.attempt 2 and a retry event; each attempt is a session span of its own", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      let attempts = 0;
      const result = await reg.withTransaction(
        async (s) => {
          attempts++;
          await s.query("SELECT 1");
          if (attempts === 1) await db().failRetryably(s);
          return "done";
        },
        { retry: { retries: 2, baseDelayMs: 1, maxDelayMs: 1 } },
      );
      expect(result).to.equal("done");
      expect(attempts).to.equal(2);
      const [first, second] = named(exporter, "transaction");
      expect(named(exporter, "transaction")).to.have.length(2);
      expect(first!.attributes).to.deep.equal({ "retry.attempt": 1 });
      expect(first!.status.code).to.equal(SpanStatusCode.ERROR);
      expect(eventNames(first!)).to.include("rollback").and.not.include("retry");
      expect(second!.attributes).to.deep.equal({ "retry.attempt": 2 });
      expect(second!.status.code).to.equal(SpanStatusCode.UNSET);
      expect(second!.events.map((e) => ({ name: e.name, attributes: e.attributes }))).to.deep.equal([
        { name: "retry", attributes: { "retry.attempt": 2 } },
      ]);
      const sessions = named(exporter, "session");
      expect(sessions).to.have.length(2);
      expect(parentOf(first!)).to.equal(idOf(sessions[0]!));
      expect(parentOf(second!)).to.equal(idOf(sessions[1]!));
      expect(sessions.map((s) => s.status.code)).to.deep.equal([SpanStatusCode.ERROR, SpanStatusCode.UNSET]);
    });
  });

  describe("free when absent", () => {
    it("tracing: true with no SDK registered: blocks work, session._trace stays undefined, and a session opened before an SDK registers stays untraced", async () => {
      await unregisterSdk();
      const reg = registry({ tracing: true });
      const untraced = await reg.withTransaction(async (s) => {
        await s.query("SELECT 1");
        return s._trace;
      });
      expect(untraced).to.equal(undefined);
      let exporter: InMemorySpanExporter | undefined;
      await reg.withSession(async (s) => {
        // The SDK arrives while this session is open: it gets no span, nor do its transactions.
        exporter = registerSdk().exporter;
        expect(s._trace).to.equal(undefined);
        await reg.withTransaction(async (tx) => {
          await tx.query("SELECT 2");
          trace.getTracer("app").startActiveSpan("app work", (span: Span) => span.end());
        });
      });
      // Only the application's own span, a root: nothing of the session's.
      expect(exporter!.getFinishedSpans().map((s) => [s.name, parentOf(s)])).to.deep.equal([["app work", undefined]]);
      // A session opened once the SDK is there is traced: the registry asks per session.
      const traced = await reg.withSession(async (s) => {
        await s.query("SELECT 3");
        return s._trace !== undefined;
      });
      expect(traced).to.equal(true);
      expect(named(exporter!, "session")).to.have.length(1);
    });

    it("tracing: false, or absent: no spans and no session._trace even with an SDK registered", async () => {
      const { exporter } = registerSdk();
      for (const option of [{ tracing: false }, {}]) {
        const reg = registry(option);
        const seen = await reg.withTransaction(async (s) => {
          await s.query("SELECT 1");
          await reg.withTransaction((inner) => inner.query("SELECT 2"));
          return s._trace;
        });
        expect(seen, JSON.stringify(option)).to.equal(undefined);
      }
      expect(exporter.getFinishedSpans()).to.deep.equal([]);
      // The exporter does get spans from a registry that asks for them.
      await registry({ tracing: true }).withTransaction((s) => s.query("SELECT 3"));
      expect(exporter.getFinishedSpans().map((s) => s.name)).to.deep.equal(["transaction", "session"]);
    });
  });

  describe("{ tracer }", () => {
    it("uses the given tracer with no SDK registered globally", async () => {
      await unregisterSdk();
      const exporter = new InMemorySpanExporter();
      const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
      try {
        const reg = registry({ tracing: { tracer: provider.getTracer("orders") } });
        const id = await reg.withTransaction(
          async (s) => {
            await s.query("SELECT 1");
            return s.id;
          },
          { name: "settle" },
        );
        const session = only(exporter, "session settle");
        const transaction = only(exporter, "transaction");
        expect(session.instrumentationScope.name).to.equal("orders");
        expect(session.attributes).to.include({ "db.system": db().system, "session.id": id });
        expect(parentOf(transaction)).to.equal(idOf(session));
        expect(traceOf(transaction)).to.equal(traceOf(session));
      } finally {
        await provider.shutdown();
      }
    });

    it("tracing: 1, { tracer: {} } or { tracer: null } throw a TypeError at createSessionRegistry", () => {
      for (const tracing of [1, "yes", { tracer: {} }, { tracer: null }, {}, null]) {
        expect(
          () => registry({ tracing } as unknown as Partial<SessionRegistryOptions>),
          JSON.stringify(tracing),
        ).to.throw(TypeError, /tracing/);
      }
    });
  });

  describe("the application's spans in a block body", () => {
    it("nest under the innermost span: transaction, savepoint, or session outside a transaction, also after an await", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const app = trace.getTracer("app");
      await reg.withTransaction(async (s) => {
        app.startActiveSpan("in transaction (active)", (span: Span) => span.end());
        await s.query("SELECT 1");
        app.startSpan("in transaction (after await)", {}, context.active()).end();
        await reg.withTransaction(async () => {
          await app.startActiveSpan("in savepoint", async (span: Span) => {
            // The span the body made is the active one within it.
            app.startSpan("in savepoint's child", {}, context.active()).end();
            span.end();
          });
        });
        app.startSpan("in transaction (after the savepoint)", {}, context.active()).end();
      });
      await reg.withSession(async (s) => {
        await s.query("SELECT 2");
        app.startSpan("in session", {}, context.active()).end();
      });
      const [txSession, plainSession] = named(exporter, "session");
      const transaction = only(exporter, "transaction");
      const savepoint = only(exporter, "savepoint");
      const parentName = (name: string): string | undefined => {
        const parent = parentOf(only(exporter, name));
        return exporter.getFinishedSpans().find((s) => idOf(s) === parent)?.name;
      };
      expect(parentName("in transaction (active)")).to.equal("transaction");
      expect(parentName("in transaction (after await)")).to.equal("transaction");
      expect(parentName("in savepoint")).to.equal("savepoint");
      expect(parentName("in savepoint's child")).to.equal("in savepoint");
      expect(parentName("in transaction (after the savepoint)")).to.equal("transaction");
      expect(parentOf(only(exporter, "in session"))).to.equal(idOf(plainSession!));
      expect(parentOf(transaction)).to.equal(idOf(txSession!));
      expect(parentOf(savepoint)).to.equal(idOf(transaction));
    });
  });

  describe("request sessions (express)", () => {
    let server: { port: number; close: () => Promise<void> } | undefined;
    afterEach(async () => {
      await server?.close();
      server = undefined;
    });

    /**
     * The app behind a handler that does what an HTTP instrumentation does: a span per
     * request, active while the app handles it; `ended` resolves once one ended.
     */
    const serve = async (app: express.Express): Promise<{ port: number; ended: Promise<void> }> => {
      const http = trace.getTracer("http");
      const ended = deferred();
      server = await listen((req, res) => {
        const span = http.startSpan(`${req.method} ${req.url}`);
        res.on("close", () => {
          span.end();
          ended.resolve();
        });
        context.with(trace.setSpan(context.active(), span), () => {
          app(req, res);
        });
      });
      return { port: server.port, ended: ended.promise };
    };

    it("the request's session span is a child of the request's span, open while the handler runs, ended once the response finished", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const app = express();
      app.set("env", "test");
      app.use(sessionMiddleware({ registry: reg }));
      let openInHandler: boolean | undefined;
      app.get("/notes", async (_req, res) => {
        const s = currentSession(reg);
        const [row] = await s.query<{ n: number }[]>("SELECT 1 AS n");
        openInHandler = s._trace?.span.isRecording() === true && named(exporter, "session").length === 0;
        res.json({ session: s.id, n: Number(row!.n) });
      });
      const { port, ended } = await serve(app);
      const reply = await send(port, "/notes");
      expect(reply.status).to.equal(200);
      const { session: id } = JSON.parse(reply.body) as { session: number };
      await idle(reg);
      expect(openInHandler, "the span was open and unexported in the handler").to.equal(true);
      const session = only(exporter, "session");
      expect(session.attributes).to.include({ "session.id": id, "session.statements": 1 });
      expect(session.ended).to.equal(true);
      await within(ended, "the request's span to end");
      const request = only(exporter, "GET /notes");
      expect(parentOf(session)).to.equal(idOf(request));
      expect(traceOf(session)).to.equal(traceOf(request));
    });

    it("a request session reopened after its request ended gets a new span", async () => {
      const { exporter } = registerSdk();
      const reg = registry({ tracing: true });
      const app = express();
      app.set("env", "test");
      app.use(sessionMiddleware({ registry: reg }));
      let kept: Session | undefined;
      app.get("/later", (_req, res) => {
        kept = currentSession(reg); // untouched: closes idle at the request's end
        res.json({ session: kept.id });
      });
      const { port } = await serve(app);
      expect((await send(port, "/later")).status).to.equal(200);
      await idle(reg);
      expect(kept!.closed).to.equal(true);
      const closed = deferred();
      reg.on("close", () => closed.resolve());
      await kept!.query("SELECT 1");
      await within(closed.promise, "the reopened session to close");
      const sessions = named(exporter, "session");
      expect(sessions.map((s) => s.attributes["session.id"])).to.deep.equal([kept!.id, kept!.id]);
      expect(sessions.map((s) => s.attributes["session.statements"])).to.deep.equal([0, 1]);
      // Each span counts its own statements: a third life after two statements says 1.
      const closedAgain = deferred();
      reg.on("close", () => closedAgain.resolve());
      await kept!.query("SELECT 1");
      await within(closedAgain.promise, "the session to close a second time");
      expect(named(exporter, "session").map((s) => s.attributes["session.statements"])).to.deep.equal([0, 1, 1]);
      expect(idOf(sessions[0]!)).to.not.equal(idOf(sessions[1]!));
    });
  });
}

describe("tracing [sqlite]", () => suite(() => sqliteDb));

describe("tracing [postgres]", () => {
  let pgUrl: string | undefined;
  before(async function () {
    if (pgServer() === undefined) this.skip();
    pgUrl = await freshDatabase("tracing");
  });
  suite(() => pgDb(pgUrl!));

  describe("statement spans of the pg instrumentation (child process)", () => {
    it("nest under the transaction, the savepoint, or the session's span outside a transaction", async function () {
      const worker = fileURLToPath(new URL("./support/tracing-pg-worker.js", import.meta.url));
      const out = await new Promise<string>((resolve, reject) =>
        execFile(process.execPath, [worker, pgUrl!], { timeout: 30_000 }, (error, stdout, stderr) =>
          error ? reject(new Error(`${error.message}\n${stderr}`)) : resolve(stdout),
        ),
      );
      const spans = JSON.parse(out) as FinishedSpan[];
      const one = (name: string): FinishedSpan => {
        const found = spans.filter((s) => s.name === name);
        expect(found, name).to.have.length(1);
        return found[0]!;
      };
      const textOf = (s: FinishedSpan): string => String(s.attributes["db.statement"] ?? s.attributes["db.query.text"]);
      const queries = spans.filter((s) => s.name.startsWith("pg.query"));
      const query = (text: string): FinishedSpan => {
        const found = queries.filter((s) => textOf(s).includes(text));
        expect(found, `${text} among ${queries.map(textOf).join(" | ")}`).to.have.length(1);
        return found[0]!;
      };
      const txSession = one("session tx");
      const transaction = one("transaction");
      const savepoint = one("savepoint");
      const plain = one("session plain");
      expect(transaction.parentSpanId).to.equal(txSession.spanId);
      expect(savepoint.parentSpanId).to.equal(transaction.spanId);
      expect(query("in_transaction").parentSpanId).to.equal(transaction.spanId);
      expect(query("in_savepoint").parentSpanId).to.equal(savepoint.spanId);
      expect(query("outside_transaction").parentSpanId).to.equal(plain.spanId);
      // The transaction's own statements are its children too.
      expect(query("START TRANSACTION").parentSpanId).to.equal(transaction.spanId);
      expect(query("COMMIT").parentSpanId).to.equal(transaction.spanId);
      for (const s of [transaction, savepoint, query("in_transaction")]) expect(s.traceId).to.equal(txSession.traceId);
    });
  });
});
