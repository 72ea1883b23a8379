import { DataSource, type DataSourceOptions } from "typeorm";
import type { SessionRegistry } from "../../src/index.js";
import { TestDatabase } from "./databases.js";
import { freshMariaDatabase, startMariaDb } from "./mariadb-hooks.js";
import { freshDatabase, pgServer } from "./postgres-hooks.js";
import { ENTITIES, TempSqlite } from "./sqlite.js";

/** A database for one test, on one of the backends the core suite runs on. */
export interface TestDb<K extends BackendKind = DefaultKind> {
  readonly kind: K;
  /** A new, not yet initialized DataSource on this database. */
  dataSource(extra?: Partial<DataSourceOptions>): DataSource;
  /** A registry on a new DataSource on this database. */
  registry(name?: string): SessionRegistry;
  dispose(): Promise<void>;
}

/** The databases the core suite runs on; MariaDB only in the suites that ask for it. */
export type BackendKind = "sqlite" | "postgres" | "mariadb";
/** The backends of every suite. */
export type DefaultKind = "sqlite" | "postgres";

/** A backend: `Backend` for every suite, `Backend<BackendKind>` in those that run on MariaDB too. */
export interface Backend<K extends BackendKind = DefaultKind> {
  readonly kind: K;
  open(): Promise<TestDb<K>>;
}

/** Connections of `dataSource` that are checked out now (0 when every session has let go). */
export function connectionsInUse(dataSource: DataSource): number {
  if (dataSource.options.type === "postgres") {
    const pool = (dataSource.driver as unknown as { master: { totalCount: number; idleCount: number } }).master;
    return pool.totalCount - pool.idleCount;
  }
  if (dataSource.options.type === "mariadb" || dataSource.options.type === "mysql") {
    const pool = (dataSource.driver as unknown as { pool: MysqlPool }).pool;
    return pool._allConnections.length - pool._freeConnections.length;
  }
  // SQLite: its one connection counts as in use while a transaction is open on it.
  return dataSource.driver.createQueryRunner("master").isTransactionActive ? 1 : 0;
}

/** The part of a mysql2 pool that says how many connections are out. */
interface MysqlPool {
  _allConnections: { length: number };
  _freeConnections: { length: number };
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

/** MariaDB: one database per run, tables emptied before each test; pools of 5. */
class MariaDb extends TestDatabase implements TestDb<"mariadb"> {
  readonly kind = "mariadb";
  readonly #url: string;

  constructor(url: string) {
    super();
    this.#url = url;
  }

  protected options(extra: Partial<DataSourceOptions>): DataSourceOptions {
    return {
      type: "mariadb",
      url: this.#url,
      entities: ENTITIES,
      extra: { connectionLimit: 5 },
      ...extra,
    } as DataSourceOptions;
  }
}

let mariaDatabase: Promise<string> | undefined;

const mariadb: Backend<"mariadb"> = {
  kind: "mariadb",
  async open() {
    mariaDatabase ??= (async () => {
      const url = await freshMariaDatabase("core");
      const ds = new DataSource({ type: "mariadb", url, entities: ENTITIES, synchronize: true });
      await ds.initialize();
      await ds.destroy();
      return url;
    })();
    const db = new MariaDb(await mariaDatabase);
    const cleaner = db.dataSource();
    await cleaner.initialize();
    for (const table of ["notes", "accounts"]) await cleaner.query(`TRUNCATE TABLE ${table}`);
    await cleaner.query("DROP TABLE IF EXISTS child, parent, transfers");
    await cleaner.destroy();
    return db;
  },
};

/**
 * Define `suite` once per backend: on SQLite (always), on PostgreSQL and, with
 * `{ mariadb: true }`, on MariaDB (each skipped, with the harness's one-line reason,
 * where no server could be started).
 *
 * @example
 * ```ts
 * forEachBackend("blocks", (backend: Backend) => { ... });
 * forEachBackend("faults", { mariadb: true }, (backend: Backend<BackendKind>) => { ... });
 * ```
 */
export function forEachBackend(title: string, suite: (backend: Backend) => void): void;
export function forEachBackend(
  title: string,
  options: { mariadb: true },
  suite: (backend: Backend<BackendKind>) => void,
): void;
export function forEachBackend(
  title: string,
  ...rest: [(backend: Backend) => void] | [{ mariadb?: boolean }, (backend: Backend<BackendKind>) => void]
): void {
  const options = rest.length === 2 ? rest[0] : {};
  // Only the suites that asked for MariaDB get it, and they take any backend.
  const suite = rest.at(-1) as (backend: Backend<BackendKind>) => void;
  const backends: Backend<BackendKind>[] = [sqlite, postgres, ...(options.mariadb === true ? [mariadb] : [])];
  for (const backend of backends) {
    describe(`${title} [${backend.kind}]`, function () {
      if (backend.kind === "postgres") {
        before(function () {
          if (pgServer() === undefined) this.skip();
        });
      }
      if (backend.kind === "mariadb") {
        before(async function () {
          this.timeout(120_000);
          if ((await startMariaDb()) === undefined) this.skip();
        });
      }
      suite(backend);
    });
  }
}
