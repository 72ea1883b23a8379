import type { ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { expect } from "chai";
import sinon from "sinon";
import { DataSource, type DataSourceOptions, QueryFailedError, type QueryRunner } from "typeorm";
import { createSessionRegistry, isRetryableError, type Session, type SessionRegistry } from "../src/index.js";
import { Note } from "./support/entities.js";
import { within } from "./support/http.js";
import { SQLITE_DRIVER, sqliteOptions, TempSqlite } from "./support/sqlite.js";
import { load, rejectionOf } from "./support/util.js";
import { startWorker } from "./support/workers.js";

/** What a worker (support/sqlite-worker.ts) prints when it is done. */
interface Summary {
  pid: number;
  journalMode: string;
  committed: number;
  failed: number;
  retries: number;
  busy: number;
  errors: string[];
  ms: number;
}

/** The driver's own option for the busy timeout: `busyTimeout` (sqlite3) or `timeout` (better-sqlite3). */
function busyTimeoutOption(ms: number): Partial<DataSourceOptions> {
  const option = SQLITE_DRIVER === "sqlite" ? { busyTimeout: ms } : { timeout: ms };
  return option;
}

/**
 * node-sqlite3 opens every database with a busy timeout of 1000 ms, which TypeORM's
 * `busyTimeout` replaces only when above 0; better-sqlite3 takes TypeORM's `timeout` as is.
 */
const NODE_SQLITE3_OWN_TIMEOUT_MS = 1000;

describe("SQLite: several processes on one file", function () {
  const children: ChildProcess[] = [];
  let db: TempSqlite;
  beforeEach(() => {
    db = new TempSqlite();
  });
  afterEach(async () => {
    for (const child of children.splice(0)) if (child.exitCode === null) child.kill("SIGKILL");
    await db.dispose();
  });

  it("3 processes × 300 read-then-write blocks with retry: 5 on one WAL file: none fails, no update lost", async function () {
    const processes = 3;
    const blocks = load(300);
    this.timeout(120_000);
    const setup = db.dataSource({ synchronize: true });
    await setup.initialize();
    await setup.query("PRAGMA journal_mode = WAL");
    await setup.query("CREATE TABLE counter (id integer PRIMARY KEY, value integer NOT NULL)");
    await setup.query("INSERT INTO counter (id, value) VALUES (1, 0)");
    await setup.destroy();

    const worker = fileURLToPath(new URL("./support/sqlite-worker.js", import.meta.url));
    const started = Array.from({ length: processes }, () =>
      startWorker<Summary>(worker, [db.path, String(blocks)], children),
    );
    // Every failure below leaves the children to afterEach, which kills them.
    await within(Promise.all(started.map((w) => w.ready)), "every worker ready", 20_000);
    const go = performance.now();
    for (const { child } of started) child.stdin.end("go\n");
    const summaries = await within(Promise.all(started.map((w) => w.done)), "every worker done", 100_000);
    const ms = Math.round(performance.now() - go);

    const check = db.dataSource({ synchronize: false });
    await check.initialize();
    const [{ value }] = await check.query<[{ value: number }]>("SELECT value FROM counter WHERE id = 1");
    const seen = (await check.query<{ block: number }[]>("SELECT block FROM notes ORDER BY block")).map((r) => r.block);
    const sum = (key: "committed" | "failed" | "retries" | "busy") => summaries.reduce((a, s) => a + s[key], 0);
    console.log(
      `      ${SQLITE_DRIVER}: ${processes} processes × ${blocks} blocks in ${ms} ms: ` +
        `committed ${sum("committed")}, failed ${sum("failed")}, retries ${sum("retries")}, ` +
        `SQLITE_BUSY/LOCKED ${sum("busy")} (per process: ${summaries.map((s) => s.busy).join("/")}), rows ${seen.length}`,
    );
    expect(summaries.map((s) => s.journalMode)).to.deep.equal(Array(processes).fill("wal"));
    expect(summaries.flatMap((s) => s.errors)).to.deep.equal([]);
    expect(sum("failed")).to.equal(0);
    expect(seen).to.have.length(processes * blocks);
    expect(value, "the counter: every block's read-then-write counted once").to.equal(processes * blocks);
    // Each block read the row count and wrote it: serialized blocks saw 0, 1, 2... each once.
    expect(seen).to.deep.equal(Array.from({ length: processes * blocks }, (_, i) => i));
  });
});

describe("SQLite: a transaction that may write takes the write lock as it begins", () => {
  let db: TempSqlite;
  let reg: SessionRegistry;
  /** Another connection to the file, which does not wait for a lock (1 ms). */
  let other: DataSource;
  beforeEach(async () => {
    db = new TempSqlite();
    reg = createSessionRegistry({ name: "immediate", dataSource: db.dataSource() });
    await reg.withSession((s) => s.query("SELECT 1")); // the tables, before the other connection opens
    other = db.dataSource({ synchronize: false, ...busyTimeoutOption(1) });
    await other.initialize();
  });
  afterEach(() => db.dispose());

  /** Whether the other connection can take the write lock now (it gives it back at once). */
  async function otherCanWrite(): Promise<boolean> {
    try {
      await other.query("BEGIN IMMEDIATE");
    } catch (error) {
      expect(isRetryableError(error), String(error)).to.equal(true);
      return false;
    }
    await other.query("ROLLBACK");
    return true;
  }

  /** The transaction statements `body` sends through a `query` spy assigned on the session's runner. */
  async function controlStatements(body: (s: Session) => Promise<unknown>): Promise<string[]> {
    return reg.withSession(async (s) => {
      const original = s.queryRunner.query;
      const query = sinon.spy(function (this: QueryRunner, ...args: Parameters<QueryRunner["query"]>) {
        return original.apply(this, args);
      });
      s.queryRunner.query = query;
      await body(s);
      return query
        .getCalls()
        .map((call) => String(call.args[0]))
        .filter((sql) => /^(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b/.test(sql));
    });
  }

  it("withTransaction: BEGIN IMMEDIATE; nested blocks stay savepoints", async () => {
    const sent = await controlStatements(() =>
      reg.withTransaction(async (s) => {
        await reg.withTransaction(() => s.getRepository(Note).insert({ body: "inner" }));
      }),
    );
    expect(sent).to.deep.equal([
      "BEGIN IMMEDIATE TRANSACTION",
      "SAVEPOINT typeorm_1",
      "RELEASE SAVEPOINT typeorm_1",
      "COMMIT",
    ]);
  });

  it("readOnly: the deferred BEGIN, which takes no lock", async () => {
    const sent = await controlStatements(() =>
      reg.withTransaction((s) => s.getRepository(Note).count(), { readOnly: true }),
    );
    expect(sent).to.deep.equal(["BEGIN TRANSACTION", "COMMIT"]);
  });

  it("s.begin(), TypeORM's manager.transaction() and the implicit transaction of save(): BEGIN IMMEDIATE", async () => {
    const sent = await controlStatements(async (s) => {
      await s.begin();
      await s.commit();
      await s.manager.transaction((m) => m.insert(Note, { body: "manager.transaction" }));
      await s.getRepository(Note).save({ body: "save" });
      expect(s.inTransaction).to.equal(false);
    });
    expect(sent).to.deep.equal([
      "BEGIN IMMEDIATE TRANSACTION",
      "COMMIT",
      "BEGIN IMMEDIATE TRANSACTION",
      "COMMIT",
      "BEGIN IMMEDIATE TRANSACTION",
      "COMMIT",
    ]);
  });

  it("holds the write lock from the BEGIN of an explicit session's transaction, before it writes; readOnly does not", async () => {
    expect(await otherCanWrite(), "nothing open").to.equal(true);
    {
      await using s = await reg.open({ transaction: true });
      await s.getRepository(Note).count();
      expect(await otherCanWrite(), "a read-write transaction that has only read").to.equal(false);
    }
    {
      await using s = await reg.open({ transaction: true, readOnly: true });
      await s.getRepository(Note).count();
      expect(await otherCanWrite(), "a readOnly transaction").to.equal(true);
    }
    expect(await otherCanWrite(), "all closed").to.equal(true);
  });
});

describe("SQLite: the busy timeout of a file database", () => {
  let db: TempSqlite;
  beforeEach(() => {
    db = new TempSqlite();
  });
  afterEach(() => db.dispose());

  async function busyTimeout(extra: Partial<DataSourceOptions>, database = db.path): Promise<number> {
    const dataSource = new DataSource(sqliteOptions(database, extra));
    const reg = createSessionRegistry({ name: "busy-timeout", dataSource });
    try {
      const [row] = await reg.withSession((s) => s.query<[{ timeout: number }]>("PRAGMA busy_timeout"));
      return row.timeout;
    } finally {
      await reg.drain({ destroy: true });
    }
  }

  it("is 5000 ms unless TypeORM's option sets it", async () => {
    expect(await busyTimeout({})).to.equal(5000);
  });

  it("TypeORM's own option wins (busyTimeout for sqlite3, timeout for better-sqlite3), 0 included", async () => {
    expect(await busyTimeout(busyTimeoutOption(250))).to.equal(250);
    // 0: no wait, on both drivers (TypeORM skips busyTimeout 0, which would leave node-sqlite3's own 1000 ms).
    expect(await busyTimeout(busyTimeoutOption(0))).to.equal(0);
  });

  it("is left alone on an in-memory database of sqlite3", async function () {
    if (SQLITE_DRIVER !== "sqlite") this.skip();
    expect(await busyTimeout({}, ":memory:")).to.equal(NODE_SQLITE3_OWN_TIMEOUT_MS);
  });
});

describe("isRetryableError: SQLITE_BUSY and SQLITE_LOCKED in every form", () => {
  const busy = Object.assign(new Error("SQLITE_BUSY: database is locked"), { errno: 5, code: "SQLITE_BUSY" });

  it("the result code, extended codes included", () => {
    for (const code of [
      "SQLITE_BUSY",
      "SQLITE_BUSY_SNAPSHOT",
      "SQLITE_BUSY_RECOVERY",
      "SQLITE_BUSY_TIMEOUT",
      "SQLITE_LOCKED",
      "SQLITE_LOCKED_SHAREDCACHE",
      "SQLITE_LOCKED_VTAB",
    ]) {
      expect(isRetryableError({ code }), code).to.equal(true);
    }
  });

  it("node-sqlite3's error, by its code or by its message alone", () => {
    expect(isRetryableError(busy)).to.equal(true);
    expect(isRetryableError(new Error("SQLITE_BUSY: database is locked"))).to.equal(true);
    expect(isRetryableError(new Error("SQLITE_LOCKED: database table is locked: notes"))).to.equal(true);
  });

  it("better-sqlite3's SqliteError (the code in `code`, not in the message)", () => {
    class SqliteError extends Error {
      override name = "SqliteError";
      readonly code: string;
      constructor(message: string, code: string) {
        super(message);
        this.code = code;
      }
    }
    expect(isRetryableError(new SqliteError("database is locked", "SQLITE_BUSY"))).to.equal(true);
    expect(isRetryableError(new SqliteError("database is locked", "SQLITE_BUSY_SNAPSHOT"))).to.equal(true);
    expect(isRetryableError(new SqliteError("database table is locked", "SQLITE_LOCKED"))).to.equal(true);
  });

  it("wrapped in TypeORM's QueryFailedError (driverError) or as a cause", () => {
    const locked = Object.assign(new Error("database table is locked"), { code: "SQLITE_LOCKED_SHAREDCACHE" });
    expect(isRetryableError(new QueryFailedError("COMMIT", [], busy))).to.equal(true);
    expect(isRetryableError(new QueryFailedError("COMMIT", [], locked))).to.equal(true);
    expect(isRetryableError(new Error("the transfer failed", { cause: busy }))).to.equal(true);
    expect(isRetryableError(new Error("outer", { cause: new QueryFailedError("COMMIT", [], locked) }))).to.equal(true);
  });

  it("other SQLite errors are not retried", () => {
    const constraint = Object.assign(new Error("SQLITE_CONSTRAINT: UNIQUE constraint failed: notes.id"), {
      code: "SQLITE_CONSTRAINT",
    });
    expect(isRetryableError(constraint)).to.equal(false);
    expect(isRetryableError(new QueryFailedError("INSERT", [], constraint))).to.equal(false);
    expect(isRetryableError({ code: "SQLITE_READONLY" })).to.equal(false);
    expect(isRetryableError({ code: "SQLITE_BUSYNESS" })).to.equal(false);
    expect(isRetryableError(new Error("not SQLITE_BUSY: a message that only mentions it"))).to.equal(false);
  });

  it("the driver's own error when another connection holds the write lock", async () => {
    const db = new TempSqlite();
    try {
      const holder = db.dataSource();
      await holder.initialize();
      await holder.query("BEGIN IMMEDIATE");
      const waiter = db.dataSource({ synchronize: false, ...busyTimeoutOption(1) });
      await waiter.initialize();
      const error = await rejectionOf(waiter.query("BEGIN IMMEDIATE"));
      expect(error).to.be.instanceOf(QueryFailedError);
      expect(isRetryableError(error), String(error)).to.equal(true);
      expect(isRetryableError((error as QueryFailedError).driverError), "the driver's error itself").to.equal(true);
      await holder.query("ROLLBACK");
    } finally {
      await db.dispose();
    }
  });
});
