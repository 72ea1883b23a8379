import { DataSource, type DataSourceOptions } from "typeorm";
import type { SessionRegistry } from "../../src/index.js";
import { TestDatabase } from "./databases.js";
import { freshDatabase, pgServer } from "./postgres-hooks.js";
import { ENTITIES, TempSqlite } from "./sqlite.js";

/** A database for one test, on one of the backends the core suite runs on. */
export interface TestDb {
  readonly kind: "sqlite" | "postgres";
  /** A new, not yet initialized DataSource on this database. */
  dataSource(extra?: Partial<DataSourceOptions>): DataSource;
  /** A registry on a new DataSource on this database. */
  registry(name?: string): SessionRegistry;
  dispose(): Promise<void>;
}

export interface Backend {
  readonly kind: "sqlite" | "postgres";
  open(): Promise<TestDb>;
}

/** Connections of `dataSource` that are checked out now (0 when every session has let go). */
export function connectionsInUse(dataSource: DataSource): number {
  if (dataSource.options.type === "postgres") {
    const pool = (dataSource.driver as unknown as { master: { totalCount: number; idleCount: number } }).master;
    return pool.totalCount - pool.idleCount;
  }
  // SQLite: its one connection counts as in use while a transaction is open on it.
  return dataSource.driver.createQueryRunner("master").isTransactionActive ? 1 : 0;
}

const sqlite: Backend = {
  kind: "sqlite",
  open: () => Promise.resolve(new TempSqlite()),
};

/** PostgreSQL: one database per run, tables emptied before each test; pools of 5. */
class PgDb extends TestDatabase implements TestDb {
  readonly kind = "postgres";
  readonly #url: string;

  constructor(url: string) {
    super();
    this.#url = url;
  }

  protected options(extra: Partial<DataSourceOptions>): DataSourceOptions {
    return { type: "postgres", url: this.#url, entities: ENTITIES, extra: { max: 5 }, ...extra } as DataSourceOptions;
  }
}

let database: Promise<string> | undefined;

const postgres: Backend = {
  kind: "postgres",
  async open() {
    database ??= (async () => {
      const url = await freshDatabase("core");
      const ds = new DataSource({ type: "postgres", url, entities: ENTITIES, synchronize: true });
      await ds.initialize();
      await ds.destroy();
      return url;
    })();
    const url = await database;
    const db = new PgDb(url);
    const cleaner = db.dataSource();
    await cleaner.initialize();
    await cleaner.query("TRUNCATE notes, accounts RESTART IDENTITY");
    for (const table of ["parent", "child", "transfers"]) await cleaner.query(`DROP TABLE IF EXISTS ${table} CASCADE`);
    await cleaner.destroy();
    return db;
  },
};

/**
 * Define `suite` once per backend: on SQLite (always) and on PostgreSQL (skipped,
 * with the harness's one-line reason, where no server could be started).
 */
export function forEachBackend(title: string, suite: (backend: Backend) => void): void {
  for (const backend of [sqlite, postgres]) {
    describe(`${title} [${backend.kind}]`, function () {
      if (backend.kind === "postgres") {
        before(function () {
          if (pgServer() === undefined) this.skip();
        });
      }
      suite(backend);
    });
  }
}
