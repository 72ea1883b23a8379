import type { DataSource, DataSourceOptions } from "typeorm";
import { describe } from "../describe.js";
import { appTypeorm, isDataSource, typeormCopies } from "../driver/typeorm.js";
import { type TracingOption, tracingOption } from "../tracing/session-trace.js";

/** A DataSource, or a function that makes one (late binding). */
export type DataSourceInput = DataSource | (() => DataSource | Promise<DataSource>);

/** Options every registry takes, whichever way it gets its DataSource. */
export interface CommonRegistryOptions {
  /**
   * Shown in errors, events and leak reports.
   * @default "default" for the default registry, else "registry-N"
   */
  name?: string;
  /**
   * A session open longer than this, in milliseconds, emits `leak` once, with the
   * stack that opened it and its name.
   * @default none
   */
  leakDetectionMs?: number;
  /**
   * OpenTelemetry spans through `@opentelemetry/api` (an optional peer): a span per
   * session (`session <name>`, `session` when unnamed), with a child span per transaction (`transaction`) and
   * savepoint (`savepoint`), `retry` and `rollback` events, the error status when a
   * block rejects, and the attributes `db.system`, `db.namespace` and `session.id`.
   * Statements run with the innermost of these spans active, so the spans of TypeORM's
   * or the driver's instrumentation nest under it. `true` uses the registered SDK's
   * tracer; `{ tracer }` a tracer of your own. Without the API installed or an SDK
   * registered, it costs nothing.
   * @default false
   */
  tracing?: TracingOption;
  /**
   * With a DataSource configured with TypeORM's `replication: { master, slaves }`: a
   * `readOnly` block that is not nested in an open transaction runs on a session of its
   * own on a replica (as if it had `propagation: "requiresNew"`), until its scope has
   * written on the primary; everything else uses the primary. No effect without `replication`.
   * Read-your-writes holds inside one scope only: a read-only block in a scope that has not
   * written may read data older than another request's commit (replica lag), and writes
   * through `dataSource.manager` are not tracked.
   * @default false
   */
  replicas?: boolean;
}

/** @internal The options a registry keeps for each DataSource it initializes. */
export interface HostSettings {
  readonly tracing: TracingOption | undefined;
  readonly replicas: boolean;
}

/** Build the registry on an existing DataSource (initialized on first use if needed). */
export interface DataSourceRegistryOptions extends CommonRegistryOptions {
  /** The DataSource, or a function that returns one (or a promise of one) for late binding. */
  dataSource: DataSourceInput;
  /** Not with `dataSource`: pass one or the other. */
  url?: never;
}

/**
 * Build the DataSource from a URL: `sqlite:./app.db`, `sqlite::memory:`,
 * `better-sqlite3:./app.db`, `postgres://user:pw@host:5432/db`. Every other
 * DataSource option (`entities`, `migrations`, `migrationsRun`, `synchronize`,
 * `logging`, `extra`, ...) passes through.
 */
export interface UrlRegistryOptions extends CommonRegistryOptions {
  /**
   * Where the database is: `sqlite:./app.db`, `sqlite::memory:`, `better-sqlite3:./app.db`,
   * `postgres://user:pw@host:5432/db`.
   */
  url: string;
  /** Not with `url`: pass one or the other. */
  dataSource?: never;
  /** TypeORM's `entities` option: entity classes, schemas or glob paths. */
  entities?: DataSourceOptions["entities"];
  /** TypeORM's `migrations` option. */
  migrations?: DataSourceOptions["migrations"];
  /** TypeORM's `migrationsRun` option: run pending migrations when the DataSource initializes. */
  migrationsRun?: boolean;
  /** TypeORM's `synchronize` option: create the schema from the entities on initialization. */
  synchronize?: boolean;
  /** TypeORM's `logging` option. */
  logging?: DataSourceOptions["logging"];
  /** TypeORM's `subscribers` option. */
  subscribers?: DataSourceOptions["subscribers"];
  /** TypeORM's `namingStrategy` option. */
  namingStrategy?: DataSourceOptions["namingStrategy"];
  /** TypeORM's `extra` option, passed to the driver (for example the `pg` pool settings). */
  extra?: unknown;
  [option: string]: unknown;
}

/**
 * Options of {@link createSessionRegistry}, {@link configureSessions} and
 * {@link SessionRegistry.configure}: a `dataSource` (or a function making one), or a
 * `url` plus DataSource options, or neither (configure the data source later), with
 * the options every registry takes.
 *
 * @example
 * ```ts
 * const options: SessionRegistryOptions = { dataSource: () => AppDataSource, name: "main", leakDetectionMs: 30_000 };
 * ```
 */
export type SessionRegistryOptions = DataSourceRegistryOptions | UrlRegistryOptions | CommonRegistryOptions;

/** @internal Throws unless `options` is an object: the first check of the constructor and `configure()`. */
export function expectOptionsObject(options: unknown): void {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`Expected registry options to be an object, got ${describe(options)}`);
  }
}

/** @internal The `leakDetectionMs` option, checked. */
export function leakDetection(options: SessionRegistryOptions): number | undefined {
  const value = options.leakDetectionMs;
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new RangeError(`Expected \`leakDetectionMs\` to be a number of milliseconds above 0, got ${describe(value)}`);
  }
  return value;
}

/** @internal The `tracing` and `replicas` options, checked. */
export function hostSettings(options: SessionRegistryOptions): HostSettings {
  const replicas = options.replicas;
  if (replicas !== undefined && typeof replicas !== "boolean") {
    throw new TypeError(`Expected \`replicas\` to be a boolean, got ${describe(replicas)}`);
  }
  return { tracing: tracingOption(options.tracing), replicas: replicas === true };
}

/** @internal The data source the options give (built from `url`), checked; `undefined` for none. */
export function dataSourceInput(options: SessionRegistryOptions): DataSourceInput | undefined {
  if ("dataSource" in options && options.dataSource !== undefined) {
    if ("url" in options && options.url !== undefined) {
      throw new TypeError("Pass either `dataSource` or `url` to the registry, not both");
    }
    const input = options.dataSource;
    if (!isDataSource(input) && typeof input !== "function") {
      throw new TypeError(
        `Expected \`dataSource\` to be a DataSource or a function returning one, got ${describe(input)}.` +
          typeormCopies(),
      );
    }
    return input;
  }
  if ("url" in options && options.url !== undefined) {
    const { url, name: _name, leakDetectionMs: _leak, tracing: _tracing, replicas: _replicas, ...rest } = options;
    const parsed = parseUrl(url);
    // The application's typeorm, the copy its entities and code use, not necessarily the library's own.
    const typeorm = appTypeorm();
    if (typeorm === undefined)
      throw new Error(`Cannot resolve typeorm from ${process.cwd()}: install it (npm install typeorm)`);
    const { DataSource } = typeorm.module;
    try {
      return new DataSource({ ...rest, ...parsed } as DataSourceOptions as never);
    } catch (error) {
      // TypeORM 1.x has no "sqlite" (sqlite3) driver: there `sqlite:` URLs use better-sqlite3.
      if (parsed.type !== "sqlite" || (error as Error | undefined)?.name !== "MissingDriverError") throw error;
      return new DataSource({ ...rest, ...parsed, type: "better-sqlite3" } as DataSourceOptions as never);
    }
  }
  return undefined;
}

/**
 * `sqlite:PATH`, `sqlite::memory:`, `better-sqlite3:PATH`, `postgres://...` (or
 * `postgresql://...`), `mysql://...` or `mariadb://...` to the DataSource options
 * that select the driver.
 *
 * @param url - the database URL
 * @returns the DataSource options `type` and `database` (SQLite) or `url` (PostgreSQL, MySQL, MariaDB)
 * @throws TypeError when `url` is not a string
 * @throws RangeError when the scheme is not one of the above, or the path or host part is missing
 * @example
 * ```ts
 * parseUrl("sqlite:./app.db"); // { type: "sqlite", database: "./app.db" }
 * parseUrl("postgres://app@localhost/app"); // { type: "postgres", url: "postgres://app@localhost/app" }
 * parseUrl("mysql://app:secret@localhost:3306/app"); // { type: "mysql", url: "mysql://app:secret@localhost:3306/app" }
 * ```
 */
export function parseUrl(url: unknown): {
  /** The TypeORM driver: `"sqlite"`, `"better-sqlite3"`, `"postgres"`, `"mysql"` or `"mariadb"`. */
  type: string;
  /** The database file, or `:memory:` (SQLite drivers). */
  database?: string;
  /** The connection URL (PostgreSQL, MySQL, MariaDB). */
  url?: string;
} {
  if (typeof url !== "string") throw new TypeError(`Expected \`url\` to be a string, got ${describe(url)}`);
  const match = /^(sqlite|better-sqlite3|postgres|postgresql|mysql|mariadb):(.*)$/.exec(url);
  if (match === null) {
    throw new RangeError(
      "Expected `url` to start with sqlite:, better-sqlite3:, postgres://, postgresql://, mysql:// or mariadb://, " +
        `got ${describe(url)}`,
    );
  }
  const [, scheme, rest] = match as unknown as [string, string, string];
  if (scheme !== "sqlite" && scheme !== "better-sqlite3") {
    const type = scheme === "postgresql" ? "postgres" : scheme;
    if (!rest.startsWith("//")) {
      const port = type === "postgres" ? 5432 : 3306;
      throw new RangeError(`Expected \`url\` of the form ${scheme}://user:pw@host:${port}/db, got ${describe(url)}`);
    }
    return { type, url };
  }
  const database = rest.startsWith("//") ? rest.slice(2) : rest;
  if (database === "") throw new RangeError(`Expected a database path after "${scheme}:", got ${describe(url)}`);
  return { type: scheme, database };
}
