// Read replicas (`replicas: true` with TypeORM's `replication`), against a real primary and a streaming hot
// standby. `SELECT pg_is_in_recovery()` is the witness of where a statement ran: true on the standby.
import { expect } from "chai";
import express from "express";
import { DataSource, type DataSourceOptions } from "typeorm";
import {
  createSessionRegistry,
  currentSession,
  NoActiveSessionError,
  PropagationError,
  type Session,
  type SessionRegistry,
  SessionTimeoutError,
  withTransaction,
} from "../src/index.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { Account, Note } from "./support/entities.js";
import { idle, listen, send, within } from "./support/http.js";
import { startReplicatedPostgres, type ReplicatedPg } from "./support/postgres-replica.js";
import { deferred, rejectionOf } from "./support/util.js";

const ENTITIES = [Note, Account];
// Marks this suite's connections in pg_stat_activity, on both servers.
const APP = "tss-replicas-spec";

/** Where a block's statements run, as seen from inside the block. */
interface Where {
  id: number;
  replica: boolean;
  recovery: boolean;
}

async function where(s: Session): Promise<Where> {
  const [row] = await s.query<{ r: boolean }[]>("SELECT pg_is_in_recovery() AS r");
  return { id: s.id, replica: s.replica, recovery: row!.r };
}

const ON_STANDBY = { replica: true, recovery: true };
const ON_PRIMARY = { replica: false, recovery: false };

async function countNotes(s: Session, body: string): Promise<number> {
  const [row] = await s.query<{ n: number }[]>("SELECT count(*)::int AS n FROM notes WHERE body = $1", [body]);
  return row!.n;
}

describe("read replicas (replicas: true, TypeORM replication)", function () {
  this.timeout(60_000);
  let pair: ReplicatedPg | undefined;
  let primaryDb: string;
  let ds: DataSource;
  let reg: SessionRegistry;
  const extraSources: DataSource[] = [];

  const replicatedOptions = (): DataSourceOptions => ({
    type: "postgres",
    replication: { master: { url: primaryDb }, slaves: [{ url: pair!.standbyUrl(primaryDb) }] },
    entities: ENTITIES,
    applicationName: APP,
    extra: { max: 5 },
  });

  /** A new, initialized DataSource, destroyed after the suite. */
  const source = async (options: DataSourceOptions): Promise<DataSource> => {
    const created = new DataSource(options);
    await created.initialize();
    extraSources.push(created);
    return created;
  };

  before(async function () {
    this.timeout(120_000);
    pair = await startReplicatedPostgres();
    if (!pair) this.skip();
    primaryDb = await pair.primary.createDatabase("replicas");
    const schema = new DataSource({ type: "postgres", url: primaryDb, entities: ENTITIES, synchronize: true });
    await schema.initialize();
    // A plain SELECT that writes: only the COMMIT of its transaction tells the registry the scope wrote.
    await schema.query(
      "CREATE FUNCTION add_note(text) RETURNS int LANGUAGE sql AS 'INSERT INTO notes (body) VALUES ($1) RETURNING id'",
    );
    await schema.destroy();
    await pair.waitForReplay();
    ds = new DataSource(replicatedOptions());
    await ds.initialize();
    reg = createSessionRegistry({ name: "replicas", dataSource: ds, replicas: true });
  });

  afterEach(async () => {
    if (!pair) return;
    // A failed test must not leave the standby paused for the next one.
    await pair.standby.adminQuery("SELECT pg_wal_replay_resume()");
    await idle(reg);
  });

  after(async () => {
    for (const s of extraSources) if (s.isInitialized) await s.destroy();
    if (ds?.isInitialized) await ds.destroy();
    await pair?.stop();
  });

  /** Stop applying WAL on the standby: from now on, what the primary commits is not visible there. */
  const pauseReplay = async () => {
    await pair!.standby.adminQuery("SELECT pg_wal_replay_pause()");
  };
  const resumeReplay = async () => {
    await pair!.standby.adminQuery("SELECT pg_wal_replay_resume()");
    await pair!.waitForReplay();
  };

  describe("1. outside any scope", () => {
    it("a readOnly transaction runs on the standby, in a session marked replica", async () => {
      const seen = await reg.withTransaction(where, { readOnly: true });
      expect(seen).to.include(ON_STANDBY);
    });

    it("plain withSession and withTransaction run on the primary, replica false", async () => {
      expect(await reg.withSession(where)).to.include(ON_PRIMARY);
      expect(await reg.withTransaction(where)).to.include(ON_PRIMARY);
    });

    it("the bare withTransaction function with { registry, readOnly } goes to the standby too", async () => {
      expect(await withTransaction(where, { registry: reg, readOnly: true })).to.include(ON_STANDBY);
    });
  });

  describe("2. in a scope that has not written", () => {
    it("a readOnly block runs on the standby in a session of its own; the scope's session stays on the primary, untouched", async () => {
      await reg.scope(async () => {
        const own = reg.current();
        const before = await where(own); // a plain SELECT outside a transaction: does not mark the scope
        const inner = await reg.withTransaction(where, { readOnly: true });
        expect(before).to.include(ON_PRIMARY);
        expect(inner).to.include(ON_STANDBY);
        expect(inner.id).to.not.equal(own.id);
        expect(reg.current()).to.equal(own);
        expect(own.inTransaction).to.equal(false);
        expect(own.closed).to.equal(false);
        expect(await where(own)).to.deep.equal(before);
      });
    });

    it("a readOnly withSession in a scope goes to the standby as well", async () => {
      await reg.scope(async () => {
        const inner = await reg.withSession(where, { readOnly: true });
        expect(inner).to.include(ON_STANDBY);
        expect(inner.id).to.not.equal(reg.current().id);
      });
    });
  });

  describe("3. sticky after a write: the scope reads its own writes on the primary", () => {
    it("(a) after a committed write transaction, a readOnly block runs on the primary and sees the row the standby does not have yet", async () => {
      const body = "sticky-commit";
      await pauseReplay();
      try {
        await reg.scope(async () => {
          const own = reg.current();
          await reg.withTransaction((s) => s.query("INSERT INTO notes (body) VALUES ($1)", [body]));
          const read = await reg.withTransaction(async (s) => ({ ...(await where(s)), n: await countNotes(s, body) }), {
            readOnly: true,
          });
          expect(read).to.include({ ...ON_PRIMARY, n: 1 });
          expect(read.id).to.equal(own.id);
        });
        // The contrast: the same read in a fresh scope goes to the standby, which has not replayed the write.
        const elsewhere = await reg.withTransaction(
          async (s) => ({ ...(await where(s)), n: await countNotes(s, body) }),
          {
            readOnly: true,
          },
        );
        expect(elsewhere).to.include({ ...ON_STANDBY, n: 0 });
      } finally {
        await resumeReplay();
      }
      // Once replayed, the standby has it: the 0 above was replication lag, not a wrong table.
      const replayed = await reg.withTransaction(async (s) => ({ ...(await where(s)), n: await countNotes(s, body) }), {
        readOnly: true,
      });
      expect(replayed).to.include({ ...ON_STANDBY, n: 1 });
    });

    it("(a') a write transaction in a requiresNew block of the scope marks the enclosing scope too", async () => {
      await reg.scope(async () => {
        await reg.withTransaction((s) => s.query("INSERT INTO notes (body) VALUES ('sticky-requires-new')"), {
          propagation: "requiresNew",
        });
        expect(await reg.withTransaction(where, { readOnly: true })).to.include(ON_PRIMARY);
      });
    });

    it("(a'') the COMMIT of a read-write transaction marks the scope, even when its only statement is a plain SELECT", async () => {
      const body = "sticky-commit-only";
      await pauseReplay();
      try {
        await reg.scope(async () => {
          const own = reg.current();
          await reg.withTransaction((s) => s.query("SELECT add_note($1)", [body]));
          const read = await reg.withTransaction(async (s) => ({ ...(await where(s)), n: await countNotes(s, body) }), {
            readOnly: true,
          });
          expect(read).to.include({ ...ON_PRIMARY, n: 1, id: own.id });
        });
      } finally {
        await resumeReplay();
      }
    });

    it("(b) an autocommit INSERT through session.query() outside a transaction marks the scope", async () => {
      const body = "sticky-autocommit";
      await pauseReplay();
      try {
        await reg.scope(async () => {
          const own = reg.current();
          const early = await reg.withTransaction(where, { readOnly: true });
          await own.query("INSERT INTO notes (body) VALUES ($1)", [body]);
          const late = await reg.withTransaction(async (s) => ({ ...(await where(s)), n: await countNotes(s, body) }), {
            readOnly: true,
          });
          expect(early).to.include(ON_STANDBY);
          expect(late).to.include({ ...ON_PRIMARY, n: 1 });
          expect(late.id).to.equal(own.id);
        });
      } finally {
        await resumeReplay();
      }
    });

    it("a plain SELECT outside a transaction does not mark the scope", async () => {
      await reg.scope(async () => {
        const own = reg.current();
        await own.query("SELECT count(*) FROM notes");
        await own.query("  /* hint */ (SELECT 1)");
        expect(await reg.withTransaction(where, { readOnly: true })).to.include(ON_STANDBY);
      });
    });

    it("a statement that is not a plain SELECT marks the scope outside a transaction, but not inside a readOnly transaction on the primary", async () => {
      const notPlain = "WITH t AS (SELECT 1 AS one) SELECT one FROM t";
      await reg.scope(async () => {
        // Joined on the scope's primary session (mandatory), in a read-only transaction: no mark.
        const joined = await reg.withTransaction(
          async (s) => {
            await s.query(notPlain);
            return where(s);
          },
          { readOnly: true, propagation: "mandatory" },
        );
        expect(joined).to.include(ON_PRIMARY);
        expect(await reg.withTransaction(where, { readOnly: true })).to.include(ON_STANDBY);
        // The same statement outside a transaction: marked.
        await reg.current().query(notPlain);
        expect(await reg.withTransaction(where, { readOnly: true })).to.include(ON_PRIMARY);
      });
    });

    it("a write in one scope does not mark another scope", async () => {
      await reg.scope(() => reg.current().query("INSERT INTO notes (body) VALUES ('scope-one')"));
      await reg.scope(async () => {
        expect(await reg.withTransaction(where, { readOnly: true })).to.include(ON_STANDBY);
      });
    });
  });

  describe("4. nested in an open transaction of the scope's session", () => {
    it("a readOnly block inside an outer readOnly transaction on the scope's primary session joins it", async () => {
      await reg.scope(async () => {
        const own = reg.current();
        const [outer, inner] = await reg.withTransaction(
          async (s) => [await where(s), await reg.withTransaction(where, { readOnly: true })] as const,
          { readOnly: true, propagation: "mandatory" },
        );
        expect(outer).to.include({ ...ON_PRIMARY, id: own.id });
        expect(inner).to.include({ ...ON_PRIMARY, id: own.id });
      });
    });

    it("a readOnly block inside a readOnly block already on the standby joins that replica session", async () => {
      const [outer, inner] = await reg.withTransaction(
        async (s) => [await where(s), await reg.withTransaction(where, { readOnly: true })] as const,
        { readOnly: true },
      );
      expect(outer).to.include(ON_STANDBY);
      expect(inner).to.deep.equal(outer);
    });

    it("a readOnly block inside a read-write transaction of the scope is refused with PropagationError, and the outer one rolls back", async () => {
      const body = "rw-outer-ro-inner";
      const outcome = await reg.scope(async () => {
        let innerError: unknown;
        const outer = await rejectionOf(
          reg.withTransaction(async (s) => {
            await s.query("INSERT INTO notes (body) VALUES ($1)", [body]);
            innerError = await rejectionOf(reg.withTransaction(where, { readOnly: true }));
            throw innerError;
          }),
        );
        return { outer, innerError };
      });
      expect(outcome.innerError).to.be.instanceOf(PropagationError);
      expect(outcome.outer).to.equal(outcome.innerError);
      expect(await reg.withSession((s) => countNotes(s, body))).to.equal(0);
    });
  });

  describe("5. propagation", () => {
    it('"mandatory" readOnly joins the scope\'s session on the primary, and has no scope to join outside one', async () => {
      await reg.scope(async () => {
        const own = reg.current();
        const joined = await reg.withTransaction(where, { readOnly: true, propagation: "mandatory" });
        expect(joined).to.include({ ...ON_PRIMARY, id: own.id });
      });
      const error = await rejectionOf(reg.withTransaction(where, { readOnly: true, propagation: "mandatory" }));
      expect(error).to.be.instanceOf(NoActiveSessionError);
    });

    it('"requiresNew" readOnly outside a transaction runs on the standby, in a scope and outside one', async () => {
      expect(await reg.withTransaction(where, { readOnly: true, propagation: "requiresNew" })).to.include(ON_STANDBY);
      await reg.scope(async () => {
        const own = reg.current();
        const inner = await reg.withTransaction(where, { readOnly: true, propagation: "requiresNew" });
        expect(inner).to.include(ON_STANDBY);
        expect(inner.id).to.not.equal(own.id);
      });
    });

    it('"requiresNew" readOnly nested in an open transaction runs in a new session on the primary', async () => {
      await reg.scope(async () => {
        const own = reg.current();
        const inner = await reg.withTransaction(
          () => reg.withTransaction(where, { readOnly: true, propagation: "requiresNew" }),
          { readOnly: true, propagation: "mandatory" },
        );
        expect(inner).to.include(ON_PRIMARY);
        expect(inner.id).to.not.equal(own.id);
      });
    });

    it('"requiresNew" readOnly in a scope that has written runs on the primary', async () => {
      await reg.scope(async () => {
        await reg.current().query("INSERT INTO notes (body) VALUES ('requires-new-after-write')");
        expect(await reg.withTransaction(where, { readOnly: true, propagation: "requiresNew" })).to.include(ON_PRIMARY);
      });
    });
    it("detached() readOnly runs on the standby; nested in an open transaction, or from a scope that has written, on the primary in a session of its own", async () => {
      expect(await reg.detached(where, { readOnly: true })).to.include(ON_STANDBY);
      await reg.scope(async () => {
        const own = reg.current();
        // Nested in an open transaction: the primary, as the contract says, though a detached block never joins.
        const fromTransaction = await reg.withTransaction(() => reg.detached(where, { readOnly: true }), {
          readOnly: true,
          propagation: "mandatory",
        });
        expect(fromTransaction).to.include(ON_PRIMARY);
        expect(fromTransaction.id).to.not.equal(own.id);
        await own.query("INSERT INTO notes (body) VALUES ('detached-after-write')");
        const afterWrite = await reg.detached(where, { readOnly: true });
        expect(afterWrite).to.include(ON_PRIMARY);
        expect(afterWrite.id).to.not.equal(own.id);
      });
    });
  });

  describe("6. when the option does nothing", () => {
    it("without replication in the DataSource options, replicas: true leaves readOnly blocks on the primary", async () => {
      const plain = await source({ type: "postgres", url: primaryDb, entities: ENTITIES, extra: { max: 2 } });
      const r = createSessionRegistry({ name: "no-replication", dataSource: plain, replicas: true });
      expect(await r.withTransaction(where, { readOnly: true })).to.include(ON_PRIMARY);
      await r.scope(async () => {
        expect(await r.withTransaction(where, { readOnly: true })).to.include({ ...ON_PRIMARY, id: r.current().id });
      });
    });

    for (const replicas of [undefined, false]) {
      it(`with replication and replicas ${String(replicas)}, readOnly blocks run on the primary`, async () => {
        const replicated = await source({ ...replicatedOptions(), extra: { max: 2 } });
        const r = createSessionRegistry({
          name: `replicas-${String(replicas)}`,
          dataSource: replicated,
          ...(replicas === undefined ? {} : { replicas }),
        });
        expect(await r.withTransaction(where, { readOnly: true })).to.include(ON_PRIMARY);
      });
    }
  });

  describe("7. a write on the replica", () => {
    it("fails with PostgreSQL's read-only error and leaves no session, no connection and no mark behind", async () => {
      const stats = reg.stats();
      await reg.scope(async () => {
        const error = await rejectionOf(
          reg.withTransaction((s) => s.query("INSERT INTO notes (body) VALUES ('refused')"), { readOnly: true }),
        );
        expect(error).to.have.property("code", "25006"); // read_only_sql_transaction
        // The failed attempt was on the replica: the scope has still not written.
        expect(await reg.withTransaction(where, { readOnly: true })).to.include(ON_STANDBY);
      });
      expect(reg.stats().active).to.equal(0);
      expect(reg.stats().opened - stats.opened).to.equal(reg.stats().closed - stats.closed);
      const pools = ds.driver as unknown as { slaves: { totalCount: number; idleCount: number }[] };
      expect(pools.slaves.map((p) => p.totalCount - p.idleCount)).to.deep.equal([0]);
      expect(await reg.withSession((s) => countNotes(s, "refused"))).to.equal(0);
    });
  });

  describe("8. express requests", () => {
    let server: { port: number; close: () => Promise<void> } | undefined;
    afterEach(async () => {
      await server?.close();
      server = undefined;
    });

    it("GET with a readOnly block reads on the standby; POST that writes then reads in the same request stays on the primary and sees its write", async () => {
      const app = express();
      app.set("env", "test");
      app.use(sessionMiddleware({ registry: reg }));
      app.get("/notes", async (_req, res) => {
        const read = await reg.withTransaction(where, { readOnly: true });
        res.json({ request: currentSession(reg).id, read });
      });
      app.post("/notes", async (_req, res) => {
        const request = currentSession(reg);
        await reg.withTransaction((s) => s.getRepository(Note).save({ body: "posted" }));
        const read = await reg.withTransaction(
          async (s) => ({ ...(await where(s)), n: await s.getRepository(Note).countBy({ body: "posted" }) }),
          { readOnly: true },
        );
        res.status(201).json({ request: request.id, read });
      });
      server = await listen(app);
      await pauseReplay();
      try {
        const got = await send(server.port, "/notes");
        const posted = await send(server.port, "/notes", { method: "POST" });
        const after = await send(server.port, "/notes");
        expect(got.status).to.equal(200);
        expect(posted.status).to.equal(201);
        const g = JSON.parse(got.body) as { request: number; read: Where };
        const p = JSON.parse(posted.body) as { request: number; read: Where & { n: number } };
        const a = JSON.parse(after.body) as { request: number; read: Where };
        expect(g.read).to.include(ON_STANDBY);
        expect(g.read.id).to.not.equal(g.request);
        expect(p.read).to.include({ ...ON_PRIMARY, n: 1, id: p.request });
        // A later request starts unmarked: back on the standby.
        expect(a.read).to.include(ON_STANDBY);
      } finally {
        await resumeReplay();
      }
    });
  });

  describe("9. timeoutMs on a replica block", () => {
    it("rejects with SessionTimeoutError quickly and cancels the statement on the standby", async () => {
      const activeSleeps = (pid: number) =>
        pair!.standby.adminQuery<{ n: number }>(
          "SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
          [pid],
        );
      let pid: number | undefined;
      let replica: boolean | undefined;
      const started = Date.now();
      const error = await rejectionOf(
        reg.withTransaction(
          async (s) => {
            const [row] = await s.query<{ pid: number; r: boolean }[]>(
              "SELECT pg_backend_pid() AS pid, pg_is_in_recovery() AS r",
            );
            pid = row!.pid;
            replica = row!.r && s.replica;
            await s.query("SELECT pg_sleep(5)");
          },
          { readOnly: true, timeoutMs: 300 },
        ),
      );
      const elapsed = Date.now() - started;
      expect(error).to.be.instanceOf(SessionTimeoutError);
      expect(replica).to.equal(true);
      expect(elapsed).to.be.below(2_000);
      // The standby's backend stops sleeping long before its 5 s are up: polled, bounded well under 5 s.
      const deadline = started + 3_000;
      let left = (await activeSleeps(pid!))[0]!.n;
      while (left > 0 && Date.now() < deadline) {
        await new Promise<void>((resolve) => setTimeout(resolve, 25));
        left = (await activeSleeps(pid!))[0]!.n;
      }
      expect(
        left,
        `pg_sleep still running on the standby (pid ${pid}) ${Date.now() - started} ms after the start`,
      ).to.equal(0);
      await within(idle(reg), "the timed-out session to close");
    });
  });

  describe("11. what stays on the primary besides", () => {
    it("a readOnly SERIALIZABLE block, which a PostgreSQL hot standby cannot run", async () => {
      const at = await reg.withTransaction(where, { readOnly: true, isolation: "SERIALIZABLE" });
      expect(at).to.include(ON_PRIMARY);
      expect(await reg.withTransaction(where, { readOnly: true, isolation: "REPEATABLE READ" })).to.include(ON_STANDBY);
    });

    it("a readOnly block of work accepted before drain() began: it runs (on the primary) instead of being refused", async () => {
      const own = createSessionRegistry({ dataSource: ds, replicas: true, name: "draining" });
      const inScope = deferred();
      const drainStarted = deferred();
      const scoped = own.scope(async () => {
        inScope.resolve();
        await drainStarted.promise;
        return own.withTransaction(where, { readOnly: true });
      });
      await inScope.promise;
      const draining = own.drain({ timeoutMs: 10_000 });
      drainStarted.resolve();
      expect(await scoped).to.include(ON_PRIMARY);
      expect((await draining).forced).to.equal(0);
    });
  });

  describe("10. option validation", () => {
    it("replicas must be a boolean", () => {
      expect(() => createSessionRegistry({ dataSource: ds, replicas: "yes" as unknown as boolean })).to.throw(
        TypeError,
        /replicas/,
      );
    });
  });
});
