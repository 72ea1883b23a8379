/**
 * node-cron 4 integration: {@link sessionTask} runs each tick in a session block, and
 * {@link DatabaseRunCoordinator} lets `distributed: true` tasks run each fire on exactly
 * one instance by keeping leases in the application's own database.
 *
 * node-cron is an optional peer dependency: only its types are used here.
 *
 * @module typeorm-scoped-session/cron
 */
import type { RunCoordinator, TaskContext } from "node-cron";
import { defaultRegistry, isRetryableError, RegistryNotConfiguredError, SessionRegistry } from "../index.js";
import type { Session, SessionOptions } from "../index.js";
import { familyOf } from "../core/driver.js";
import { describe, resolveOptions } from "../core/options.js";
import { findScope, storage } from "../core/scope.js";

/** The body of a {@link sessionTask}: receives the tick's session and node-cron's context. */
export type SessionTaskBody<T> = (session: Session, context: TaskContext) => T | Promise<T>;

/**
 * Make a node-cron 4 task function that runs `fn(session, context)` in
 * `withSession` of the registry named by `options.registry` (default: the default
 * registry): each tick is a unit of work whose session is removed (rolled back if
 * needed, its connection released) before the tick settles.
 *
 * An application that made its own registry (`const db = createSessionRegistry(...)`)
 * passes it here, as it does to {@link DatabaseRunCoordinator}:
 * `sessionTask(fn, { registry: db })`. Without the option the task uses the default
 * registry; while that has no data source (no `configureSessions()`), each tick
 * rejects with a {@link typeorm-scoped-session!RegistryNotConfiguredError} that says
 * so, which node-cron logs and reports as `execution:failed`.
 *
 * A tick never joins a scope that has already ended. Timers inherit the async
 * context in which they were created, so a task scheduled from inside a session
 * block would otherwise find that block's closed scope on every tick.
 *
 * @param fn - the body; receives the session and node-cron's {@link TaskContext}
 * @param options - block options (see {@link SessionOptions}), checked now; `name`
 *   defaults to the task's name (`context.task.name`), else `fn`'s name
 * @returns a task function for `cron.schedule()` / `cron.createTask()`; its promise
 *   settles with `fn`'s result after the session is removed, and rejects as
 *   {@link typeorm-scoped-session!withSession} does (`fn`'s own error included)
 * @throws TypeError when `fn` is not a function, TypeError/RangeError on invalid options
 * @example
 * ```ts
 * import cron from "node-cron";
 * import { sessionTask } from "typeorm-scoped-session/cron";
 *
 * cron.schedule(
 *   "0 * * * *",
 *   sessionTask(async (s, { date }) => {
 *     await s.getRepository(Invoice).update({ dueAt: LessThan(date), state: "open" }, { state: "overdue" });
 *   }, { registry: db, transaction: true }),
 *   { name: "overdue-invoices" },
 * );
 * ```
 */
export function sessionTask<T>(fn: SessionTaskBody<T>, options?: SessionOptions): (context: TaskContext) => Promise<T> {
  if (typeof fn !== "function") throw new TypeError(`Expected the task body to be a function, got ${describe(fn)}`);
  resolveOptions(options, undefined, false); // throws now rather than on every tick
  const registry = options?.registry ?? defaultRegistry;
  const defaulted = options?.registry === undefined;
  const fallbackName = fn.name === "" ? undefined : fn.name;
  return function cronSessionTask(context: TaskContext): Promise<T> {
    const name = options?.name ?? context?.task?.name ?? fallbackName;
    const tick = () => registry.withSession((session) => fn(session, context), { ...options, name });
    // The scope of the code that scheduled the task, captured by node-cron's timers, is over.
    const ticking = findScope(storage.getStore(), registry)?.ended === true ? storage.exit(tick) : tick();
    return defaulted
      ? ticking.catch((error: unknown) => Promise.reject(noRegistryGiven(error, "sessionTask")))
      : ticking;
  };
}

/**
 * The default registry's RegistryNotConfiguredError, for an integration that was
 * given no `registry` option, reworded to name the likely fix: the application made
 * a registry of its own and meant that one.
 */
function noRegistryGiven(error: unknown, caller: "sessionTask" | "DatabaseRunCoordinator"): unknown {
  if (!(error instanceof RegistryNotConfiguredError)) return error;
  const fix =
    caller === "sessionTask" ? "sessionTask(fn, { registry: db })" : "new DatabaseRunCoordinator({ registry: db })";
  const loud = new RegistryNotConfiguredError(error.registryName);
  loud.message =
    `${caller} was given no \`registry\` option, so it uses the default registry ("${error.registryName}"), ` +
    `which has no data source. If your application made its own registry ` +
    `(const db = createSessionRegistry(...)), pass it: ${fix} — the same registry for the task and ` +
    `its DatabaseRunCoordinator. Otherwise call configureSessions({ dataSource }) at start-up.`;
  return loud;
}

/** Options of {@link DatabaseRunCoordinator}. */
export interface DatabaseRunCoordinatorOptions {
  /**
   * The registry whose database keeps the leases.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
  /**
   * The lease table: a plain SQL identifier (letters, digits, `_`; up to 48
   * characters), created with its index if missing.
   * @default "scoped_session_cron_leases"
   */
  table?: string;
}

/** How one database spells what the coordinator needs. */
interface Dialect {
  /** The database clock, in milliseconds since the epoch, fixed for the statement. */
  readonly now: string;
  /** The n-th placeholder, from 1. */
  param(n: number): string;
  readonly family: "postgres" | "sqlite";
}

const DIALECTS: Record<"postgres" | "sqlite", Dialect> = {
  postgres: {
    family: "postgres",
    now: "(extract(epoch from statement_timestamp()) * 1000)::bigint",
    param: (n) => `$${n}`,
  },
  sqlite: {
    family: "sqlite",
    now: "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    param: () => "?",
  },
};

const OPTIONS = new Set(["registry", "table"]);
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,47}$/;
/** Expired leases deleted per acquisition, at most: cleanup never makes a fire wait long. */
const PURGE_LIMIT = 100;
/** Attempts of one statement that failed with a retryable error (SQLITE_BUSY from another process). */
const ATTEMPTS = 8;

/**
 * A node-cron 4 `RunCoordinator` that keeps leases in a table of the registry's own
 * database (PostgreSQL or SQLite), so that `distributed: true` runs each fire on
 * exactly one instance without Redis.
 *
 * node-cron asks {@link shouldRun} with one key per fire (`name:ISO-time`). The key
 * is granted to exactly one caller, by one atomic statement, and to nobody else
 * until its lease (`distributedLease`, node-cron's default 30 s) expires, even after
 * {@link onComplete}, which only records completion: asking again for a granted key
 * gives `false`, also to the winner. Expired leases are purged during later
 * acquisitions. Times come from the database's clock, so instances whose clocks
 * differ still agree.
 *
 * The table is created on first use if missing (`CREATE TABLE IF NOT EXISTS`, once
 * per coordinator): `key` (primary key), `acquired_at`, `expires_at`, `completed_at`,
 * in milliseconds since the epoch. Create it in a migration instead if the
 * application's database user may not create tables.
 *
 * Its statements run in their own sessions of the registry (never in the caller's
 * scope or transaction), so on SQLite they take their turn on the single connection.
 *
 * Give the task's {@link sessionTask} the same registry (`{ registry: db }`): each
 * defaults to the default registry on its own. Without the option, while the
 * default registry has no data source, {@link shouldRun} rejects with a
 * {@link typeorm-scoped-session!RegistryNotConfiguredError} that says so, and
 * node-cron skips the fire (`execution:skipped`, reason `coordinator-error`).
 *
 * @example
 * ```ts
 * import cron from "node-cron";
 * import { DatabaseRunCoordinator, sessionTask } from "typeorm-scoped-session/cron";
 *
 * cron.schedule("0 * * * *", sessionTask(sendReminders, { registry: db }), {
 *   name: "reminders", // forms the keys: every instance must use the same name
 *   distributed: true,
 *   runCoordinator: new DatabaseRunCoordinator({ registry: db }),
 * });
 * ```
 */
export class DatabaseRunCoordinator implements RunCoordinator {
  /** The registry whose database keeps the leases. */
  readonly registry: SessionRegistry;
  /** The lease table. */
  readonly table: string;

  /** Whether no `registry` option was given (the default registry is used). */
  readonly #defaulted: boolean;
  /** The table creation in progress or done, and the DataSource it was done on. */
  #prepared: { dataSource: object | undefined; promise: Promise<Dialect> } | undefined;

  /**
   * Create a coordinator on the database of `options.registry`. Only checks the
   * options: the database is first touched, and the table created if missing, by
   * the first {@link shouldRun} or {@link onComplete}.
   *
   * @param options - `registry` (default: the default registry) and `table`
   *   (default `"scoped_session_cron_leases"`)
   * @throws TypeError on options that are not an object, an unknown option, or a
   *   `registry` that is not a SessionRegistry; RangeError on a `table` that is not a
   *   plain SQL identifier
   * @example
   * ```ts
   * const coordinator = new DatabaseRunCoordinator({ registry: db, table: "cron_leases" });
   * ```
   */
  constructor(options: DatabaseRunCoordinatorOptions = {}) {
    if (typeof options !== "object" || options === null) {
      throw new TypeError(`Expected DatabaseRunCoordinator options to be an object, got ${describe(options)}`);
    }
    for (const key of Object.keys(options)) {
      if (!OPTIONS.has(key)) {
        throw new TypeError(`Unknown DatabaseRunCoordinator option \`${key}\`; expected one of registry, table`);
      }
    }
    const { registry = defaultRegistry, table = "scoped_session_cron_leases" } = options;
    if (!(registry instanceof SessionRegistry)) {
      throw new TypeError(`Expected \`registry\` to be a SessionRegistry, got ${describe(registry)}`);
    }
    if (typeof table !== "string") throw new TypeError(`Expected \`table\` to be a string, got ${describe(table)}`);
    if (!IDENTIFIER.test(table)) {
      throw new RangeError(
        `Expected \`table\` to be a plain SQL identifier (a letter or _, then letters, digits or _; up to 48 characters), got ${describe(table)}`,
      );
    }
    this.registry = registry;
    this.#defaulted = options.registry === undefined;
    this.table = table;
  }

  /**
   * Take the lease on `key` for `ttlMs` milliseconds if nobody holds it: `true` for
   * exactly one caller, `false` for everyone else (the winner included) until the
   * lease expires. Also deletes up to 100 expired leases.
   *
   * @param key - one fire of one task, as node-cron forms it: `name:ISO-time`
   * @param ttlMs - how long the lease lasts, in milliseconds
   * @returns whether this caller runs the fire
   * @throws TypeError/RangeError (as a rejection) on an empty key or a ttl that is not a positive number
   * @throws (as a rejection) the database error when the lease could not be read or written; node-cron then skips the fire
   * @throws Error (as a rejection) when the registry's database is neither PostgreSQL nor SQLite
   * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError},
   *   {@link typeorm-scoped-session!RegistryClosedError} (as rejections) while the registry has no data
   *   source, or drains
   * @example
   * ```ts
   * if (await coordinator.shouldRun("report:2025-01-01T00:00:00.000Z", 60_000)) await buildReport();
   * ```
   */
  async shouldRun(key: string, ttlMs: number): Promise<boolean> {
    assertKey(key);
    if (typeof ttlMs !== "number" || !Number.isFinite(ttlMs) || ttlMs <= 0) {
      throw new RangeError(`Expected \`ttlMs\` to be a number of milliseconds above 0, got ${describe(ttlMs)}`);
    }
    const d = await this.#prepare();
    const t = quote(this.table);
    const purge =
      d.family === "postgres"
        ? `DELETE FROM ${t} WHERE "key" IN (SELECT "key" FROM ${t} WHERE expires_at <= ${d.now} ORDER BY expires_at LIMIT ${PURGE_LIMIT} FOR UPDATE SKIP LOCKED)`
        : `DELETE FROM ${t} WHERE "key" IN (SELECT "key" FROM ${t} WHERE expires_at <= ${d.now} ORDER BY expires_at LIMIT ${PURGE_LIMIT})`;
    // One statement decides: inserted (new key) or taken over (its lease expired), else untouched.
    const acquire =
      `INSERT INTO ${t} ("key", acquired_at, expires_at) VALUES (${d.param(1)}, ${d.now}, ${d.now} + ${d.param(2)}) ` +
      `ON CONFLICT ("key") DO UPDATE SET acquired_at = excluded.acquired_at, expires_at = excluded.expires_at, completed_at = NULL ` +
      `WHERE ${t}.expires_at <= excluded.acquired_at`;
    return this.#run("DatabaseRunCoordinator.shouldRun", async (s) => {
      await s.query(purge);
      const result = await s.queryRunner.query(acquire, [key, Math.ceil(ttlMs)], true);
      return (result.affected ?? 0) > 0;
    });
  }

  /**
   * Record that the fire `key` has finished (`completed_at`). The lease is kept until
   * it expires, so the fire is not run again.
   *
   * @param key - the key given to {@link shouldRun}
   * @throws TypeError (as a rejection) on an empty key; the database error when it could not be written
   * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError},
   *   {@link typeorm-scoped-session!RegistryClosedError} (as rejections) while the registry has no data
   *   source, or drains
   * @example
   * ```ts
   * await coordinator.onComplete("report:2025-01-01T00:00:00.000Z");
   * ```
   */
  async onComplete(key: string): Promise<void> {
    assertKey(key);
    const d = await this.#prepare();
    const t = quote(this.table);
    await this.#run("DatabaseRunCoordinator.onComplete", (s) =>
      s.query(`UPDATE ${t} SET completed_at = ${d.now} WHERE "key" = ${d.param(1)}`, [key]),
    );
  }

  /** Create the table if missing, once per DataSource of the registry; learn the dialect. */
  #prepare(): Promise<Dialect> {
    const current = this.registry.dataSource;
    const prepared = this.#prepared;
    if (prepared !== undefined && (prepared.dataSource === undefined || prepared.dataSource === current)) {
      return prepared.promise;
    }
    const entry: { dataSource: object | undefined; promise: Promise<Dialect> } = {
      dataSource: current,
      promise: this.#run("DatabaseRunCoordinator.createTable", async (s) => {
        const dataSource = s.manager.connection;
        const family = familyOf(dataSource);
        if (family !== "postgres" && family !== "sqlite") {
          throw new Error(
            `DatabaseRunCoordinator supports PostgreSQL and SQLite; registry "${this.registry.name}" uses ${String(dataSource.options.type)}`,
          );
        }
        const d = DIALECTS[family];
        const create = [
          `CREATE TABLE IF NOT EXISTS ${quote(this.table)} ("key" VARCHAR(512) PRIMARY KEY, acquired_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, completed_at BIGINT)`,
          `CREATE INDEX IF NOT EXISTS ${quote(`${this.table}_expires_at`)} ON ${quote(this.table)} (expires_at)`,
        ];
        if (family === "postgres") {
          // Concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL's catalog: one at a time.
          await this.registry.withTransaction(async (tx) => {
            await tx.query("SELECT pg_advisory_xact_lock(hashtext($1))", [`typeorm-scoped-session:${this.table}`]);
            for (const sql of create) await tx.query(sql);
          });
        } else {
          for (const sql of create) await s.query(sql);
        }
        entry.dataSource = dataSource;
        return d;
      }),
    };
    this.#prepared = entry;
    // A failure is not kept: the next call tries again.
    entry.promise.catch(() => {
      if (this.#prepared === entry) this.#prepared = undefined;
    });
    return entry.promise;
  }

  /**
   * Run `body` in a session of its own (`detached`: never part of the caller's scope
   * or transaction, nor of a finished scope captured by node-cron's timers), again on
   * a retryable error such as SQLITE_BUSY from another process.
   */
  async #run<T>(name: string, body: (session: Session) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.registry.detached(body, { name });
      } catch (error) {
        if (this.#defaulted && error instanceof RegistryNotConfiguredError) {
          throw noRegistryGiven(error, "DatabaseRunCoordinator");
        }
        if (attempt >= ATTEMPTS || !isRetryableError(error)) throw error;
      }
      const delay = Math.min(250, 5 * 2 ** attempt) * (0.5 + Math.random() / 2);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

function assertKey(key: unknown): asserts key is string {
  if (typeof key !== "string" || key === "") {
    throw new TypeError(`Expected \`key\` to be a non-empty string, got ${describe(key)}`);
  }
}

function quote(identifier: string): string {
  return `"${identifier}"`;
}
