// MySQL and MariaDB on a real MariaDB server (started by spec/support/mariadb.ts; skipped, with one
// line saying why, where the server binaries are missing).
import { expect } from "chai";
import { DataSource } from "typeorm";
import {
  createSessionRegistry,
  isRetryableError,
  type Session,
  SessionTimeoutError,
  type SessionRegistry,
} from "../src/index.js";
import { discardConnection } from "../src/core/driver/driver.js";
import { parseUrl } from "../src/core/registry/registry-options.js";
import { connectionsInUse } from "./support/backends.js";
import { Account, Note } from "./support/entities.js";
import { freshMariaDatabase, type MariaDbServer, startMariaDb } from "./support/mariadb-hooks.js";
import { ENTITIES } from "./support/sqlite.js";
import { deferred, recordEvents, rejectionOf, seeded } from "./support/util.js";

class Boom extends Error {}

/** The part of a mysql2 pool connection the tests look at. */
interface PooledConnection {
  threadId: number;
  _closing?: boolean;
}

/** The part of a mysql2 pool the tests look at. */
interface Pool {
  _allConnections: { length: number; toArray?: () => unknown[] };
  _freeConnections: { length: number };
}

const poolOf = (reg: SessionRegistry): Pool => (reg.dataSource!.driver as unknown as { pool: Pool }).pool;

describe("MySQL and MariaDB without a server", () => {
  it("parses mysql:// and mariadb:// and names every accepted scheme when the scheme is unknown", () => {
    expect(parseUrl("mysql://user:pw@host:3306/db")).to.deep.equal({
      type: "mysql",
      url: "mysql://user:pw@host:3306/db",
    });
    expect(parseUrl("mariadb://user:pw@host/db")).to.deep.equal({
      type: "mariadb",
      url: "mariadb://user:pw@host/db",
    });
    expect(() => parseUrl("mysql:host/db")).to.throw(RangeError, /mysql:\/\/user:pw@host:3306\/db/);
    expect(() => parseUrl("mssql://h/d")).to.throw(
      RangeError,
      /sqlite:, better-sqlite3:, postgres:\/\/, postgresql:\/\/, mysql:\/\/ or mariadb:\/\/, got `"mssql:\/\/h\/d"`/,
    );
  });

  it("isRetryableError: deadlock (1213) and lock wait timeout (1205), as mysql2 reports them and wrapped by TypeORM", () => {
    const deadlock = Object.assign(new Error("Deadlock found when trying to get lock"), {
      errno: 1213,
      code: "ER_LOCK_DEADLOCK",
    });
    const lockWait = Object.assign(new Error("Lock wait timeout exceeded"), { errno: 1205 });
    expect(isRetryableError(deadlock)).to.equal(true);
    expect(isRetryableError(lockWait)).to.equal(true);
    expect(isRetryableError({ code: "ER_LOCK_WAIT_TIMEOUT" })).to.equal(true);
    expect(isRetryableError(Object.assign(new Error("query failed"), { driverError: deadlock }))).to.equal(true);
    expect(isRetryableError(Object.assign(new Error("read only"), { errno: 1792 }))).to.equal(false);
    expect(isRetryableError(Object.assign(new Error("duplicate"), { errno: 1062, code: "ER_DUP_ENTRY" }))).to.equal(
      false,
    );
  });
});

describe("MySQL and MariaDB", function () {
  let server: MariaDbServer;
  let url: string;
  let database: string;
  const registries: SessionRegistry[] = [];

  before(async function () {
    this.timeout(120_000);
    const started = await startMariaDb();
    if (started === undefined) this.skip();
    server = started;
    url = await freshMariaDatabase("mysql_spec");
    database = url.slice(url.lastIndexOf("/") + 1);
    const ds = new DataSource({ type: "mariadb", url, entities: ENTITIES, synchronize: true });
    await ds.initialize();
    await ds.destroy();
  });

  beforeEach(async () => {
    await server.adminQuery(`TRUNCATE TABLE \`${database}\`.notes`);
    await server.adminQuery(`TRUNCATE TABLE \`${database}\`.accounts`);
  });

  afterEach(async () => {
    for (const reg of registries.splice(0)) await reg.drain({ timeoutMs: 5_000, destroy: true });
  });

  /** A registry from a URL on the suite's database, with a pool of `size` connections. */
  const registry = (size = 5, scheme: "mysql" | "mariadb" = "mariadb"): SessionRegistry => {
    const reg = createSessionRegistry({
      url: url.replace(/^mysql:/, `${scheme}:`),
      entities: ENTITIES,
      extra: { connectionLimit: size },
      name: `mysql spec (${size})`,
    });
    registries.push(reg);
    return reg;
  };

  /** Connections of the suite's database that the server has open now. */
  const serverConnections = async (): Promise<number> => {
    const [row] = await server.adminQuery<{ n: number }>(
      "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST WHERE DB = ?",
      [database],
    );
    return Number(row!.n);
  };

  /** InnoDB transactions open now, on any connection. */
  const openTransactions = async (): Promise<number> => {
    const [row] = await server.adminQuery<{ n: number }>("SELECT COUNT(*) AS n FROM information_schema.INNODB_TRX");
    return Number(row!.n);
  };

  const threadOf = async (s: Session): Promise<number> => {
    const [row] = await s.query<{ id: number | string }[]>("SELECT CONNECTION_ID() AS id");
    return Number(row!.id);
  };

  const count = (reg: SessionRegistry) => reg.withSession((s) => s.getRepository(Note).count());

  describe("urls", () => {
    for (const scheme of ["mysql", "mariadb"] as const) {
      it(`a registry from a ${scheme}:// url connects (driver "${scheme}")`, async () => {
        const reg = registry(2, scheme);
        const [row] = await reg.withSession((s) =>
          s.query<{ v: string; db: string }[]>("SELECT VERSION() AS v, DATABASE() AS db"),
        );
        expect(row).to.deep.equal({ v: server.version, db: database });
        expect(reg.dataSource!.options.type).to.equal(scheme);
      });
    }
  });

  describe("connections", () => {
    it("outside a transaction a session holds no connection between statements: pool of 2, 3× as many sessions mixing the session and dataSource.manager", async () => {
      const reg = registry(2);
      await reg.withSession((s) => s.query("SELECT 1")); // initialized
      const sessions = 6;
      const firstDone = Array.from({ length: sessions }, () => deferred());
      const all = Promise.all(firstDone.map((d) => d.promise));
      const results = await Promise.all(
        firstDone.map((done, i) =>
          reg.withSession(
            async (s) => {
              await s.getRepository(Note).insert({ body: `session ${i}`, block: i });
              done.resolve();
              // Every session has run a statement; were connections pinned, some would never get here.
              await all;
              const viaManager = await reg.dataSource!.manager.count(Note);
              const own = await s.getRepository(Note).countBy({ block: i });
              return { viaManager, own };
            },
            { timeoutMs: 20_000 },
          ),
        ),
      );
      expect(results.every((r) => r.viaManager === sessions && r.own === 1)).to.equal(true);
      expect(poolOf(reg)._allConnections.length).to.be.at.most(2);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    });

    it("Promise.all of statements in one session, inside and outside a transaction", async () => {
      const reg = registry(2);
      await reg.withTransaction((s) =>
        Promise.all(Array.from({ length: 30 }, (_, i) => s.getRepository(Note).insert({ body: `tx ${i}`, block: i }))),
      );
      const counts = await reg.withSession((s) =>
        Promise.all(Array.from({ length: 20 }, (_, i) => s.getRepository(Note).countBy({ block: i }))),
      );
      expect(counts).to.deep.equal(Array.from({ length: 20 }, () => 1));
      expect(await count(reg)).to.equal(30);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    });

    it("guarantee 1: after 500 sessions with faults, no connection is checked out and none is open beyond the pool", async function () {
      this.timeout(120_000);
      const reg = registry(5);
      const random = seeded(500);
      const outcomes = await Promise.allSettled(
        Array.from({ length: 500 }, (_, i) => {
          const roll = random();
          return reg.withSession(
            async (s) => {
              await s.getRepository(Note).insert({ body: `s${i}`, block: i });
              if (roll < 0.2) throw new Boom(`block ${i}`);
              if (roll < 0.3) await s.query("SELECT * FROM no_such_table");
              return i;
            },
            { transaction: roll < 0.6 },
          );
        }),
      );
      const resolved = outcomes.filter((o) => o.status === "fulfilled").length;
      expect(resolved).to.be.within(100, 450);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      expect(poolOf(reg)._allConnections.length).to.be.at.most(5);
      expect(await serverConnections()).to.equal(poolOf(reg)._allConnections.length);
      expect(await openTransactions()).to.equal(0);
    });
  });

  describe("transactions", () => {
    it("commit and rollback", async () => {
      const reg = registry(2);
      await reg.withTransaction((s) => s.getRepository(Note).insert({ body: "kept", block: 1 }));
      const boom = new Boom("undo");
      const error = await rejectionOf(
        reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: "undone", block: 2 });
          throw boom;
        }),
      );
      expect(error).to.equal(boom);
      expect(await reg.withSession((s) => s.getRepository(Note).find())).to.have.deep.members([
        { id: 1, body: "kept", block: 1 },
      ]);
    });

    it("uncommitted rows are invisible to another session", async () => {
      const reg = registry(2);
      const inserted = deferred();
      const seen = deferred();
      const writer = reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "pending", block: 1 });
        inserted.resolve();
        await seen.promise;
      });
      await inserted.promise;
      expect(await count(reg)).to.equal(0);
      seen.resolve();
      await writer;
      expect(await count(reg)).to.equal(1);
    });

    it("savepoints: a nested block that fails undoes only its own work, three deep", async () => {
      const reg = registry(2);
      const { log } = recordEvents(reg, ["begin", "rollback", "commit"]);
      await reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "a", block: 1 });
        await reg.withTransaction(async () => {
          await s.getRepository(Note).insert({ body: "b", block: 2 });
          await rejectionOf(
            reg.withTransaction(async () => {
              await s.getRepository(Note).insert({ body: "c", block: 3 });
              throw new Boom("c");
            }),
          );
          await s.getRepository(Note).insert({ body: "d", block: 4 });
        });
      });
      const bodies = await reg.withSession(async (s) =>
        (await s.getRepository(Note).find({ order: { id: "ASC" } })).map((n) => n.body),
      );
      expect(bodies).to.deep.equal(["a", "b", "d"]);
      expect(log.map((l) => l.split("#")[0] + (l.endsWith(":sp") ? ":sp" : ""))).to.deep.equal([
        "begin",
        "begin:sp",
        "begin:sp",
        "rollback:sp",
        "commit:sp",
        "commit",
      ]);
    });

    it("readOnly rejects writes with error 1792, and the connection is read-write for the next session", async () => {
      const reg = registry(1); // one connection: the next session gets the very same one
      const before = await reg.withSession(threadOf);
      const error = await rejectionOf(
        reg.withTransaction((s) => s.getRepository(Note).insert({ body: "nope", block: 1 }), { readOnly: true }),
      );
      expect(error).to.have.nested.property("driverError.errno", 1792);
      expect(String(error)).to.match(/READ ONLY transaction/);
      expect(await reg.withTransaction(async (s) => s.getRepository(Note).count(), { readOnly: true })).to.equal(0);
      // With an isolation level as well (TypeORM sends SET TRANSACTION ISOLATION LEVEL after ours).
      const isolated = await rejectionOf(
        reg.withTransaction((s) => s.getRepository(Note).insert({ body: "nope", block: 1 }), {
          readOnly: true,
          isolation: "SERIALIZABLE",
        }),
      );
      expect(isolated).to.have.nested.property("driverError.errno", 1792);
      const after = await reg.withSession(async (s) => {
        const [row] = await s.query<{ ro: number | string }[]>("SELECT @@tx_read_only AS ro");
        await s.getRepository(Note).insert({ body: "writable", block: 2 });
        await reg.withTransaction((t) => t.getRepository(Note).insert({ body: "in a transaction too", block: 3 }));
        return { thread: await threadOf(s), readOnly: Number(row!.ro) };
      });
      expect(after).to.deep.equal({ thread: before, readOnly: 0 });
      expect(await count(reg)).to.equal(2);
    });

    it("DDL commits implicitly: rows written before and after it stay even when the block rolls back", async () => {
      const reg = registry(2);
      await rejectionOf(
        reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: "before the DDL", block: 1 });
          await s.query("CREATE TABLE IF NOT EXISTS ddl_probe (id INT PRIMARY KEY)");
          await s.getRepository(Note).insert({ body: "after the DDL", block: 2 });
          throw new Boom("roll back");
        }),
      );
      await reg.withSession((s) => s.query("DROP TABLE ddl_probe"));
      const bodies = await reg.withSession(async (s) => (await s.getRepository(Note).find()).map((n) => n.body));
      // MySQL's implicit commit: the CREATE TABLE committed what came before it, and what came
      // after ran in autocommit mode, so the block's ROLLBACK had nothing left to undo.
      expect(bodies).to.deep.equal(["before the DDL", "after the DDL"]);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    });
  });

  describe("retry", () => {
    /** Two transactions that lock accounts 1 and 2 in opposite order: one of them deadlocks (1213). */
    const crossing = async (reg: SessionRegistry, retry: number) => {
      await reg.withSession((s) => s.getRepository(Account).insert([{ balance: 100 }, { balance: 100 }]));
      const locked = [deferred(), deferred()];
      let attempts = 0;
      const transfer = (from: number, to: number, mine: number) =>
        reg.withTransaction(
          async (s) => {
            attempts += 1;
            const accounts = s.getRepository(Account);
            await accounts.decrement({ id: from }, "balance", 10);
            locked[mine]!.resolve();
            await locked[1 - mine]!.promise; // both hold a lock the other is about to ask for
            await accounts.increment({ id: to }, "balance", 10);
          },
          { retry, name: `transfer ${from}→${to}` },
        );
      const outcomes = await Promise.allSettled([transfer(1, 2, 0), transfer(2, 1, 1)]);
      const balances = await reg.withSession(async (s) =>
        (await s.getRepository(Account).find({ order: { id: "ASC" } })).map((a) => a.balance),
      );
      return { outcomes, balances, attempts };
    };

    it("a real deadlock (1213) is retryable, and without retry one side rejects with it", async () => {
      const { outcomes, balances } = await crossing(registry(2), 0);
      const rejected = outcomes.flatMap((o) => (o.status === "rejected" ? [o.reason as unknown] : []));
      expect(rejected).to.have.length(1);
      expect(rejected[0]).to.have.nested.property("driverError.errno", 1213);
      expect(isRetryableError(rejected[0])).to.equal(true);
      expect(balances.reduce((a, b) => a + b)).to.equal(200);
    });

    it("with retry: 2 both transfers succeed, the deadlocked one on its second attempt", async () => {
      const reg = registry(2);
      const retried: number[] = [];
      reg.on("begin", ({ attempt }) => attempt !== undefined && attempt > 1 && retried.push(attempt));
      const { outcomes, balances, attempts } = await crossing(reg, 2);
      expect(outcomes.map((o) => o.status)).to.deep.equal(["fulfilled", "fulfilled"]);
      expect(balances).to.deep.equal([100, 100]);
      expect(attempts).to.equal(3);
      expect(retried).to.deep.equal([2]);
      expect(await openTransactions()).to.equal(0);
    });

    it("a lock wait timeout (1205) is retried", async () => {
      const reg = registry(2);
      await reg.withSession((s) => s.getRepository(Account).insert({ balance: 1 }));
      const holding = deferred();
      const firstAttemptFailed = deferred();
      reg.on("rollback", ({ attempt }) => attempt === 1 && firstAttemptFailed.resolve());
      const holder = reg.withTransaction(async (s) => {
        await s.query("SELECT * FROM accounts WHERE id = 1 FOR UPDATE");
        holding.resolve();
        await firstAttemptFailed.promise;
      });
      await holding.promise;
      const errors: unknown[] = [];
      const waiter = reg.withTransaction(
        async (s) => {
          await s.query("SET SESSION innodb_lock_wait_timeout = 1");
          try {
            await s.getRepository(Account).increment({ id: 1 }, "balance", 1);
          } catch (error) {
            errors.push(error);
            throw error;
          }
        },
        { retry: 1 },
      );
      await Promise.all([holder, waiter]);
      expect(errors).to.have.length(1);
      expect(errors[0]).to.have.nested.property("driverError.errno", 1205);
      expect(await reg.withSession((s) => s.getRepository(Account).findOneByOrFail({ id: 1 }))).to.include({
        balance: 2,
      });
    });
  });

  describe("timeoutMs", () => {
    it("during a lock wait rejects with SessionTimeoutError promptly (KILL QUERY), and leaks no connection", async () => {
      const reg = registry(2);
      await reg.withSession((s) => s.getRepository(Account).insert({ balance: 1 }));
      const holding = deferred();
      const release = deferred();
      const holder = reg.withTransaction(async (s) => {
        await s.query("SELECT * FROM accounts WHERE id = 1 FOR UPDATE");
        holding.resolve();
        await release.promise;
      });
      await holding.promise;
      const errors: unknown[] = [];
      reg.on("error", (e) => errors.push(e.error));
      const started = performance.now();
      const error = await rejectionOf(
        reg.withTransaction((s) => s.query("SELECT * FROM accounts WHERE id = 1 FOR UPDATE"), { timeoutMs: 200 }),
      );
      const elapsed = performance.now() - started;
      expect(error).to.be.instanceOf(SessionTimeoutError);
      // innodb_lock_wait_timeout is 50 s: only a cancelled statement lets the ROLLBACK through this soon.
      expect(elapsed).to.be.below(5_000);
      expect(errors).to.deep.equal([]);
      release.resolve();
      await holder;
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      expect(await serverConnections()).to.equal(poolOf(reg)._allConnections.length);
      expect(await openTransactions()).to.equal(0);
      // Both pooled connections work.
      await Promise.all([0, 1].map(() => reg.withTransaction((s) => s.query("SELECT 1"))));
    });
  });

  describe("timeoutMs outside a transaction", () => {
    it("a long statement is cancelled: the block rejects promptly and the connection is back in the pool", async () => {
      const reg = registry(1);
      const before = await reg.withSession(threadOf);
      const started = performance.now();
      const error = await rejectionOf(reg.withSession((s) => s.query("SELECT SLEEP(30)"), { timeoutMs: 200 }));
      expect(error).to.be.instanceOf(SessionTimeoutError);
      expect(performance.now() - started).to.be.below(5_000);
      expect(await reg.withSession(threadOf), "the same pooled connection, still usable").to.equal(before);
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      expect(await serverConnections()).to.equal(1);
    });
  });

  describe("guarantee 8: a connection whose COMMIT failed is destroyed", () => {
    it("the pinned connection killed mid-transaction: COMMIT rejects, nothing is committed, the pool stays consistent", async () => {
      const reg = registry(2);
      await reg.withSession((s) => s.query("SELECT 1"));
      const { log } = recordEvents(reg, ["commit", "rollback"]);
      let connection!: PooledConnection;
      const error = await rejectionOf(
        reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: "lost", block: 1 });
          connection = (s.queryRunner as unknown as { databaseConnection: PooledConnection }).databaseConnection;
          await server.adminQuery(`KILL ${await threadOf(s)}`);
        }),
      );
      expect(String(error)).to.match(/closed|lost|ended|ECONNRESET|EPIPE|gone away|killed/i);
      expect(log.map((l) => l.split("#")[0])).to.not.include("commit");
      const pool = poolOf(reg);
      expect(pool._allConnections.toArray?.() ?? [], "the dead connection is out of the pool").to.not.include(
        connection,
      );
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      expect(await Promise.all([0, 1].map(() => reg.withTransaction((s) => s.query("SELECT 1"))))).to.have.length(2);
      expect(await count(reg)).to.equal(0);
      expect(await serverConnections()).to.equal(pool._allConnections.length);
    });

    it("discardConnection destroys a live pooled connection with a transaction open: it leaves the pool and the server", async () => {
      const ds = new DataSource({ type: "mariadb", url, entities: ENTITIES, extra: { connectionLimit: 2 } });
      await ds.initialize();
      try {
        const runner = ds.createQueryRunner();
        await runner.startTransaction();
        await runner.manager.insert(Note, { body: "open", block: 1 });
        const [row] = (await runner.query("SELECT CONNECTION_ID() AS id")) as { id: number }[];
        const pool = (ds.driver as unknown as { pool: Pool }).pool;
        expect(pool._allConnections.length).to.equal(1);
        await discardConnection(runner, false, new Error("COMMIT failed"));
        expect(runner.isReleased).to.equal(true);
        expect(pool._allConnections.length).to.equal(0);
        // The server sees the disconnect shortly after the socket closes.
        let present = true;
        for (let i = 0; i < 100 && present; i++) {
          const rows = await server.adminQuery("SELECT ID FROM information_schema.PROCESSLIST WHERE ID = ?", [row!.id]);
          present = rows.length > 0;
          if (present) await new Promise<void>((r) => setTimeout(r, 20));
        }
        expect(present, "the server thread of the destroyed connection is gone").to.equal(false);
        expect(await ds.manager.count(Note)).to.equal(0);
      } finally {
        await ds.destroy();
      }
    });
  });
});
