import type { DataSource, QueryRunner } from "typeorm";

/** The few driver differences the core cares about. */
export type DriverFamily = "sqlite" | "postgres" | "mysql" | "other";

const FAMILIES: Record<string, DriverFamily> = {
  sqlite: "sqlite",
  "better-sqlite3": "sqlite",
  sqljs: "sqlite",
  capacitor: "sqlite",
  cordova: "sqlite",
  expo: "sqlite",
  nativescript: "sqlite",
  "react-native": "sqlite",
  postgres: "postgres",
  cockroachdb: "postgres",
  "aurora-postgres": "postgres",
  mysql: "mysql",
  mariadb: "mysql",
  "aurora-mysql": "mysql",
};

/** @internal */
export function familyOf(dataSource: DataSource): DriverFamily {
  return FAMILIES[String(dataSource.options.type)] ?? "other";
}

/**
 * @internal Whether the driver hands every caller one shared QueryRunner (and so
 * one connection), as TypeORM's SQLite drivers do. Asked of the driver itself
 * rather than of a list of names, so that it holds for drivers we do not know.
 */
export function isSingleConnection(dataSource: DataSource): boolean {
  const driver = dataSource.driver;
  const first = driver.createQueryRunner("master");
  const second = driver.createQueryRunner("master");
  if (first === second) return true;
  // Never connected, so there is nothing to give back; a driver that complains may.
  first.release().catch(() => undefined);
  second.release().catch(() => undefined);
  return false;
}

/**
 * @internal Never let a connection whose COMMIT or ROLLBACK failed be reused: a
 * pooled connection is destroyed (PostgreSQL: released with the error, which makes
 * node-postgres end it; MySQL: `destroy()`, which closes it and takes it out of the
 * pool); the single shared one is rolled back as far as it goes and TypeORM's idea
 * of its state reset.
 */
export async function discardConnection(runner: QueryRunner, shared: boolean, error: unknown): Promise<void> {
  if (shared) {
    for (const sql of ["ROLLBACK", "PRAGMA query_only = OFF"]) {
      try {
        await runner.query(sql);
      } catch {
        // "no transaction is active": the state we want.
      }
    }
    Object.assign(runner, { isTransactionActive: false, transactionDepth: 0 });
    return;
  }
  const destroy = (runner as { releasePostgresConnection?: (error: unknown) => Promise<void> })
    .releasePostgresConnection;
  try {
    if (typeof destroy === "function") {
      await destroy.call(runner, error instanceof Error ? error : new Error(String(error)));
    } else if (!destroyMysqlConnection(runner)) {
      await runner.release();
    }
  } catch {
    // Releasing a broken connection may fail as well; it is gone either way.
  }
}

/**
 * A MySQL runner's pooled connection (mysql2 or mysql) destroyed instead of released:
 * `destroy()` closes the socket and takes it out of the pool. The runner is then
 * released as TypeORM's `release()` would, without handing the connection back.
 */
function destroyMysqlConnection(runner: QueryRunner): boolean {
  if (runner.constructor.name !== "MysqlQueryRunner") return false;
  const connection = (runner as unknown as { databaseConnection?: { destroy?: () => void } }).databaseConnection;
  if (typeof connection?.destroy !== "function") return false;
  Object.assign(runner, { isReleased: true });
  connection.destroy();
  return true;
}

/**
 * @internal Whether `runner` can take a connection from the pool again after
 * `release()` once {@link reconnectable} has reset it: TypeORM's PostgreSQL and
 * MySQL runners, which keep their connection in `databaseConnection`. Others keep
 * their connection for the session's life.
 */
export function canReconnect(runner: QueryRunner): boolean {
  return RECONNECTABLE.has(runner.constructor.name);
}

const RECONNECTABLE = new Set(["PostgresQueryRunner", "MysqlQueryRunner"]);

/**
 * @internal The one place that writes into TypeORM's runners so that a released one
 * can connect again: `connect()` takes a new pooled connection when it has none
 * (`databaseConnection`, `databaseConnectionPromise`) and `query()` refuses a runner
 * marked `isReleased`. The same fields in TypeORM 0.3 and 1.x, for PostgreSQL and MySQL.
 */
export function reconnectable(runner: QueryRunner): void {
  Object.assign(runner, { isReleased: false, databaseConnection: undefined, databaseConnectionPromise: undefined });
}

/**
 * @internal Cancel the statement `runner`'s connection is running, from a connection
 * of its own (the pool may be exhausted), where the driver can: PostgreSQL
 * (`pg_cancel_backend`), MySQL and MariaDB (`KILL QUERY`, which ends the statement
 * and keeps the connection and its transaction). A no-op elsewhere.
 */
export async function cancelStatement(dataSource: DataSource, runner: QueryRunner): Promise<void> {
  const family = familyOf(dataSource);
  if (family === "mysql") return cancelMysqlStatement(dataSource, runner);
  if (family !== "postgres") return;
  const driver = dataSource.driver as unknown as {
    postgres?: { Client: new (options: unknown) => PgClient };
    master?: { options?: unknown };
  };
  const { databaseConnection: connection, mode } = runner as unknown as {
    databaseConnection?: { processID?: number; connectionParameters?: Record<string, unknown> };
    mode?: string;
  };
  const pid = connection?.processID;
  // A replica's backend is cancelled on that replica: the same pid on the primary is another backend.
  const options = mode === "slave" ? replicaClientOptions(connection?.connectionParameters) : driver.master?.options;
  if (driver.postgres === undefined || options === undefined || pid === undefined) return;
  const client = new driver.postgres.Client(options);
  try {
    await client.connect();
    await client.query("SELECT pg_cancel_backend($1)", [pid]);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** What a pg client needs to reach the server a replica runner's connection is on. */
function replicaClientOptions(parameters: Record<string, unknown> | undefined): object | undefined {
  if (parameters === undefined) return undefined;
  const { host, port, user, password, database, ssl } = parameters;
  return { host, port, user, password, database, ssl };
}

interface PgClient {
  connect(): Promise<unknown>;
  query(sql: string, parameters: unknown[]): Promise<unknown>;
  end(): Promise<unknown>;
}

/** The part of a mysql2 (or mysql) connection used to cancel a statement. */
interface MysqlConnection {
  threadId?: number | null;
  config?: Record<string, unknown>;
  on(event: "error", listener: (error: unknown) => void): unknown;
  query(sql: string, parameters: unknown[], callback: (error: unknown) => void): unknown;
  destroy(): void;
}

/** What a connection to the same server as the runner's needs: where, who, and how. */
const MYSQL_CONNECT_KEYS = ["host", "port", "socketPath", "localAddress", "user", "password", "ssl", "authPlugins"];
const MYSQL_CANCEL_TIMEOUT_MS = 5_000;

/**
 * `KILL QUERY <thread id>` on a new connection made with the runner's connection's own
 * settings (so it reaches the same server, replicas included), bounded in time.
 */
async function cancelMysqlStatement(dataSource: DataSource, runner: QueryRunner): Promise<void> {
  const mysql = (dataSource.driver as unknown as { mysql?: { createConnection?: (o: unknown) => MysqlConnection } })
    .mysql;
  const busy = (runner as unknown as { databaseConnection?: MysqlConnection }).databaseConnection;
  const threadId = busy?.threadId;
  if (typeof mysql?.createConnection !== "function" || typeof threadId !== "number" || busy?.config === undefined) {
    return;
  }
  const options: Record<string, unknown> = { connectTimeout: MYSQL_CANCEL_TIMEOUT_MS };
  for (const key of MYSQL_CONNECT_KEYS) if (busy.config[key] !== undefined) options[key] = busy.config[key];
  const connection = mysql.createConnection(options);
  connection.on("error", () => undefined);
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await new Promise<void>((resolve, reject) => {
      timer = setTimeout(
        () => reject(new Error(`KILL QUERY ${threadId} did not answer within ${MYSQL_CANCEL_TIMEOUT_MS} ms`)),
        MYSQL_CANCEL_TIMEOUT_MS,
      );
      connection.query(`KILL QUERY ${threadId}`, [], (error) =>
        // 1094 (unknown thread): the connection is gone already, and its statement with it.
        error && (error as { errno?: unknown }).errno !== 1094 ? reject(error) : resolve(),
      );
    });
  } finally {
    clearTimeout(timer);
    connection.destroy();
  }
}

/** @internal The busy timeout a SQLite file database gets when TypeORM's options set none. */
export const DEFAULT_SQLITE_BUSY_TIMEOUT_MS = 5_000;

/** Connections given the default busy timeout already. */
const busyTimeoutSet = new WeakSet<object>();

/**
 * @internal node-sqlite3 (TypeORM's `type: "sqlite"`) opens a database with a busy
 * timeout of its own of 1000 ms, which TypeORM's `busyTimeout` option replaces: a
 * statement that finds another process holding the lock waits that long, then fails
 * with SQLITE_BUSY. Give a file database's connection {@link DEFAULT_SQLITE_BUSY_TIMEOUT_MS}
 * instead, as TypeORM's better-sqlite3 driver has by default (its `timeout` option). An
 * explicit `busyTimeout` above 0 is TypeORM's to apply, and in-memory databases are left
 * alone. `busyTimeout: 0`, which TypeORM skips (node-sqlite3 would keep its 1000 ms), is
 * applied here: no wait, as better-sqlite3's `timeout: 0`. Once per connection.
 */
export function applyDefaultBusyTimeout(dataSource: DataSource): void {
  const options = dataSource.options as { type: unknown; database?: unknown; busyTimeout?: unknown };
  if (options.type !== "sqlite" || !isFileDatabase(options.database)) return;
  const { busyTimeout } = options;
  if (busyTimeout !== undefined && busyTimeout !== 0) return;
  const connection = (dataSource.driver as unknown as { databaseConnection?: SqliteConnection }).databaseConnection;
  if (typeof connection?.configure !== "function" || busyTimeoutSet.has(connection)) return;
  busyTimeoutSet.add(connection);
  connection.configure("busyTimeout", busyTimeout === 0 ? 0 : DEFAULT_SQLITE_BUSY_TIMEOUT_MS);
}

/** The part of a node-sqlite3 `Database` used to set its busy timeout. */
interface SqliteConnection {
  configure(option: "busyTimeout", milliseconds: number): void;
}

function isFileDatabase(database: unknown): boolean {
  if (typeof database !== "string" || database === "" || database === ":memory:") return false;
  return !database.startsWith("file::memory:") && !/[?&]mode=memory\b/.test(database);
}

/** Leading whitespace, block and line comments and opening parentheses, then SELECT. */
const PLAIN_SELECT = /^(?:\s|\/\*[\s\S]*?\*\/|--[^\n]*\n|\()*select\b/i;

/**
 * Whether `sql` is a plain SELECT (a `WITH` may hold an `INSERT`, so it does not count). With `replicas`, any other statement on the primary keeps the
 * scope there.
 *
 * @internal
 * @example
 * ```ts
 * isPlainSelect('SELECT "id" FROM "user" WHERE "id" = $1'); // true
 * isPlainSelect("INSERT INTO note VALUES (1)"); // false
 * ```
 */
export function isPlainSelect(sql: string): boolean {
  return PLAIN_SELECT.test(sql);
}
