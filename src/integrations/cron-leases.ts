/**
 * The SQL of `DatabaseRunCoordinator`'s lease table, in the two dialects it supports.
 *
 * @internal
 * @module
 */
import { isRetryableError, RegistryNotConfiguredError } from "../index.js";
import type { Session, SessionRegistry } from "../index.js";
import { familyOf } from "../core/driver/driver.js";
import { noRegistryGiven } from "./cron-options.js";

/** Attempts of one statement that failed with a retryable error (SQLITE_BUSY from another process). */
const ATTEMPTS = 8;
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

/** Expired leases deleted per acquisition, at most: cleanup never makes a fire wait long. */
const PURGE_LIMIT = 100;
/** With takeover, a lapsed lease nobody took over (no other instance was up) is purged after a day. */
const ORPHAN_MS = 86_400_000;

/**
 * The statements of one coordinator on one database. Parameters are named in each
 * comment, in the order they appear in the text (SQLite's `?` binds by position).
 *
 * @internal
 */
export interface LeaseSql {
  readonly family: "postgres" | "sqlite";
  /** The table and its index, if missing. */
  readonly create: readonly string[];
  /** Delete up to 100 leases nobody needs any more. */
  readonly purge: string;
  /**
   * Insert the lease, or take over one that lapsed (without takeover: one that
   * expired, completed or not): (key, lease length in ms).
   */
  readonly acquire: string;
  /** Extend a running fire's lease: (lease length in ms, key). */
  readonly renew: string;
  /** Record completion; with takeover also keep the row for a while: ([how long in ms, ]key). */
  readonly complete: string;
  /** A waiter's look at the fire: `completed_at` and `remaining` ms of its lease: (key). */
  readonly watch: string;
  /** Take over a lapsed, uncompleted lease: (lease length in ms, key). */
  readonly takeOver: string;
  /** Give back a lease at once, for a live instance to take over: (key). */
  readonly handBack: string;
}

/**
 * The statements of `table` on `family`; `takeover` as the coordinator's option.
 *
 * @internal
 */
export function leaseSql(family: "postgres" | "sqlite", table: string, takeover: boolean): LeaseSql {
  const d = DIALECTS[family];
  const t = `"${table}"`;
  const forUpdate = family === "postgres" ? " FOR UPDATE SKIP LOCKED" : "";
  // Without takeover any expired lease goes; with it, only completed ones (and day-old orphans),
  // so that a lapsed lease stays for a waiter to take over.
  const expired = takeover
    ? `(completed_at IS NOT NULL AND expires_at <= ${d.now}) OR expires_at <= ${d.now} - ${ORPHAN_MS}`
    : `expires_at <= ${d.now}`;
  return {
    family,
    create: [
      `CREATE TABLE IF NOT EXISTS ${t} ("key" VARCHAR(512) PRIMARY KEY, acquired_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, completed_at BIGINT)`,
      `CREATE INDEX IF NOT EXISTS "${table}_expires_at" ON ${t} (expires_at)`,
    ],
    purge: `DELETE FROM ${t} WHERE "key" IN (SELECT "key" FROM ${t} WHERE ${expired} ORDER BY expires_at LIMIT ${PURGE_LIMIT}${forUpdate})`,
    // One statement decides: inserted (new key) or taken over, else untouched.
    acquire:
      `INSERT INTO ${t} ("key", acquired_at, expires_at) VALUES (${d.param(1)}, ${d.now}, ${d.now} + ${d.param(2)}) ` +
      `ON CONFLICT ("key") DO UPDATE SET acquired_at = excluded.acquired_at, expires_at = excluded.expires_at, completed_at = NULL ` +
      `WHERE ${takeover ? `${t}.completed_at IS NULL AND ` : ""}${t}.expires_at <= excluded.acquired_at`,
    renew: `UPDATE ${t} SET expires_at = ${d.now} + ${d.param(1)} WHERE "key" = ${d.param(2)} AND completed_at IS NULL`,
    complete: takeover
      ? `UPDATE ${t} SET completed_at = ${d.now}, expires_at = ${d.now} + ${d.param(1)} WHERE "key" = ${d.param(2)}`
      : `UPDATE ${t} SET completed_at = ${d.now} WHERE "key" = ${d.param(1)}`,
    watch: `SELECT completed_at, expires_at - ${d.now} AS remaining FROM ${t} WHERE "key" = ${d.param(1)}`,
    takeOver:
      `UPDATE ${t} SET acquired_at = ${d.now}, expires_at = ${d.now} + ${d.param(1)} ` +
      `WHERE "key" = ${d.param(2)} AND completed_at IS NULL AND expires_at <= ${d.now}`,
    handBack: `UPDATE ${t} SET expires_at = ${d.now} WHERE "key" = ${d.param(1)} AND completed_at IS NULL`,
  };
}

/**
 * Create the lease table of `table` if missing, in `session` of `registry`, and
 * return its statements.
 *
 * @throws Error when the registry's database is neither PostgreSQL nor SQLite
 * @internal
 */
export async function createLeaseTable(
  registry: SessionRegistry,
  session: Session,
  table: string,
  takeover: boolean,
): Promise<LeaseSql> {
  const dataSource = session.manager.connection;
  const family = familyOf(dataSource);
  if (family !== "postgres" && family !== "sqlite") {
    throw new Error(
      `DatabaseRunCoordinator supports PostgreSQL and SQLite; registry "${registry.name}" uses ${String(dataSource.options.type)}`,
    );
  }
  const sql = leaseSql(family, table, takeover);
  if (family === "postgres") {
    // Concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL's catalog: one at a time.
    await registry.withTransaction(async (tx) => {
      await tx.query("SELECT pg_advisory_xact_lock(hashtext($1))", [`typeorm-scoped-session:${table}`]);
      for (const statement of sql.create) await tx.query(statement);
    });
  } else {
    for (const statement of sql.create) await session.query(statement);
  }
  return sql;
}

/**
 * Run `body` in a session of its own (`detached`: never part of the caller's scope
 * or transaction, nor of a finished scope captured by node-cron's timers), again on
 * a retryable error such as SQLITE_BUSY from another process. `duringDrain`: the
 * bookkeeping of a granted fire, which drain() lets through and waits for.
 * `defaulted`: the coordinator was given no registry.
 *
 * @internal
 */
export async function leaseStatement<T>(
  registry: SessionRegistry,
  defaulted: boolean,
  name: string,
  duringDrain: boolean,
  body: (session: Session) => Promise<T>,
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await (duringDrain ? registry._detachedDuringDrain(body, { name }) : registry.detached(body, { name }));
    } catch (error) {
      if (defaulted && error instanceof RegistryNotConfiguredError) {
        throw noRegistryGiven(error, "DatabaseRunCoordinator");
      }
      if (attempt >= ATTEMPTS || !isRetryableError(error)) throw error;
    }
    const delay = Math.min(250, 5 * 2 ** attempt) * (0.5 + Math.random() / 2);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}
