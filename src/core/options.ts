import { describe } from "./describe.js";
import { isRegistry } from "./registry-brand.js";
import type { SessionRegistry } from "./registry.js";

// Re-exported for the modules that validate their own options.
export { describe };

/**
 * Transaction isolation levels, as TypeORM names them; the {@link SessionOptions.isolation}
 * option and the argument of {@link Session.begin}.
 */
export type IsolationLevel = "READ UNCOMMITTED" | "READ COMMITTED" | "REPEATABLE READ" | "SERIALIZABLE";

/**
 * How a block relates to the session of its scope.
 *
 * - `"required"`: join the scope's session (creating it if the scope has none yet);
 *   outside any scope, open a new one.
 * - `"requiresNew"`: open a separate session on its own connection. On a
 *   single-connection driver (SQLite) it rejects with {@link PropagationError}
 *   while the scope holds an open transaction.
 * - `"mandatory"`: join the scope's session; outside any scope reject with
 *   {@link NoActiveSessionError}.
 *
 * @example
 * ```ts
 * // its own connection and transaction: kept even if the caller's transaction rolls back
 * await withTransaction((s) => s.getRepository(AuditEntry).insert(entry), { propagation: "requiresNew" });
 * ```
 */
export type Propagation = "required" | "requiresNew" | "mandatory";

/**
 * Options of {@link withSession}, {@link withTransaction}, the registry's blocks,
 * the decorators and {@link typeorm-scoped-session/cron!sessionTask}. Every option is
 * checked: an unknown key or a wrong value is refused with `TypeError`/`RangeError`
 * naming the option and the value received (as a rejection by the blocks; thrown at
 * once by the decorators and `sessionTask`).
 *
 * @example
 * ```ts
 * const settle: SessionOptions = { transaction: true, isolation: "SERIALIZABLE", retry: 3, timeoutMs: 5_000 };
 * await withSession((s) => settleInvoices(s), { ...settle, name: "settleInvoices" });
 * ```
 */
export interface SessionOptions {
  /**
   * The registry to use.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
  /**
   * Begin a transaction before the body, commit when it resolves, roll back when it throws.
   * @default false
   */
  transaction?: boolean;
  /**
   * Isolation level of the transaction (implies `transaction: true`). Rejected with
   * {@link PropagationError} on a block that joins an open transaction.
   * @default the driver's default
   */
  isolation?: IsolationLevel;
  /**
   * How the block relates to the session of its scope.
   * @default "required"
   */
  propagation?: Propagation;
  /**
   * A transactional block nested in an open transaction uses a SAVEPOINT, so its
   * failure undoes only its own work. `false`: join the enclosing transaction (or
   * savepoint); an inner failure then marks it rollback-only, so the outermost
   * block rolls back and rejects (with {@link PropagationError} naming the inner
   * block if the outer body caught the inner error) instead of committing.
   * @default true
   */
  savepoint?: boolean;
  /**
   * A read-only transaction where the database supports it: PostgreSQL
   * (`SET TRANSACTION READ ONLY`) and SQLite (`PRAGMA query_only` for the
   * transaction). Implies `transaction: true`. Rejected with {@link PropagationError}
   * on a block nested in a read-write transaction.
   * @default false
   */
  readOnly?: boolean;
  /**
   * The block must be the outermost transaction; nested inside one it rejects with
   * {@link PropagationError}. Implies `transaction: true`.
   * @default false
   */
  durable?: boolean;
  /**
   * Reject with {@link SessionTimeoutError} when the block (waiting for a connection
   * and running the body) takes longer, in milliseconds. The session is then closed:
   * its transaction rolled back (on PostgreSQL the running statement is cancelled
   * first), its connection released, its `signal` aborted; later calls by the
   * abandoned body get {@link SessionClosedError}. On a block that joins its scope's
   * session, that session is the one closed: the unit of work as a whole has failed.
   * With `retry`, each attempt has this long.
   * @default none
   */
  timeoutMs?: number;
  /**
   * Extra attempts for a transactional block that failed with a retryable error (see
   * {@link isRetryableError}: serialization failure 40001, deadlock 40P01, MySQL
   * deadlock or lock wait timeout, SQLITE_BUSY and SQLITE_LOCKED, as when another
   * process held a SQLite file's write lock beyond the busy timeout): `retry: 3` runs the
   * body at most 4 times, each from the start in a new transaction, with capped
   * exponential backoff and jitter. Only the outermost transactional block retries.
   * @default 0
   * @example
   * ```ts
   * await withTransaction(transfer, { isolation: "SERIALIZABLE", retry: { retries: 5, baseDelayMs: 20 } });
   * ```
   */
  retry?: number | RetryOptions;
  /**
   * Label for errors, events and leak reports.
   * @default the function's name; `Class.method` for a decorated method
   */
  name?: string;
  /**
   * Keep one pooled connection from the session's first statement until it closes,
   * also between statements outside a transaction, for work that needs connection
   * state: `SET` (not `SET LOCAL`), temporary tables, session-level advisory locks,
   * `LISTEN`. Without it a session holds a pooled connection only while its statements
   * run, and from BEGIN to COMMIT or ROLLBACK. On a block that joins its scope's
   * session, that session keeps its connection from then on. No effect on SQLite,
   * whose one connection every session shares.
   * @default false
   * @example
   * ```ts
   * await withSession(async (s) => {
   *   await s.query("SET search_path TO tenant_42");
   *   await s.getRepository(Invoice).find(); // same connection, same search_path
   * }, { holdConnection: true });
   * ```
   */
  holdConnection?: boolean;
}

/**
 * The object form of {@link SessionOptions.retry}.
 *
 * @example
 * ```ts
 * const retry: RetryOptions = { retries: 5, baseDelayMs: 20, maxDelayMs: 500 };
 * await withTransaction(transfer, { isolation: "SERIALIZABLE", retry });
 * ```
 */
export interface RetryOptions {
  /** Extra attempts after the first. */
  retries: number;
  /**
   * Delay before the first retry; doubled for each further one, with jitter.
   * @default 10
   */
  baseDelayMs?: number;
  /**
   * Cap on the delay between attempts.
   * @default 1000 (or `baseDelayMs`, if that is larger)
   */
  maxDelayMs?: number;
  /**
   * Decides which errors are retried, in place of {@link isRetryableError}.
   * @default isRetryableError
   */
  retryOn?: (error: unknown) => boolean;
}

/** @internal Options after validation, defaults applied. */
export interface ResolvedOptions {
  readonly registry: SessionRegistry | undefined;
  readonly transaction: boolean;
  readonly isolation: IsolationLevel | undefined;
  readonly propagation: Propagation;
  readonly savepoint: boolean;
  readonly readOnly: boolean;
  readonly durable: boolean;
  readonly name: string | undefined;
  readonly timeoutMs: number | undefined;
  readonly retry: ResolvedRetry | undefined;
  readonly holdConnection: boolean;
}

/** @internal */
export interface ResolvedRetry {
  readonly retries: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
  readonly retryOn: (error: unknown) => boolean;
  /** A new attempt begins: forget the verdict on the last one (see block.ts `decidedOnce`). */
  readonly attemptBegins?: () => void;
}

const ISOLATION_LEVELS: readonly IsolationLevel[] = [
  "READ UNCOMMITTED",
  "READ COMMITTED",
  "REPEATABLE READ",
  "SERIALIZABLE",
];
const PROPAGATIONS: readonly Propagation[] = ["required", "requiresNew", "mandatory"];
const KNOWN = new Set<string>([
  "registry",
  "transaction",
  "isolation",
  "propagation",
  "savepoint",
  "readOnly",
  "durable",
  "name",
  "timeoutMs",
  "retry",
  "holdConnection",
]);

function expectBoolean(
  options: SessionOptions,
  key: "transaction" | "savepoint" | "readOnly" | "durable" | "holdConnection",
): boolean {
  const value: unknown = options[key];
  if (value === undefined) return false;
  if (typeof value !== "boolean") throw new TypeError(`Expected \`${key}\` to be a boolean, got ${describe(value)}`);
  return value;
}

function expectOneOf<T extends string>(key: string, value: unknown, allowed: readonly T[]): T | undefined {
  if (value === undefined) return undefined;
  if (!allowed.includes(value as T)) {
    throw new RangeError(
      `Expected \`${key}\` to be one of ${allowed.map((a) => JSON.stringify(a)).join(", ")}, got ${describe(value)}`,
    );
  }
  return value as T;
}

/**
 * Options of `registry.open()` and `openSession()`: those of a block that make sense
 * for a session the caller owns (it never joins another, so no `propagation`,
 * `savepoint`, `durable` or `retry`).
 */
export type OpenOptions = Pick<
  SessionOptions,
  "registry" | "transaction" | "isolation" | "readOnly" | "timeoutMs" | "name" | "holdConnection"
>;

const OPEN_KNOWN = new Set<string>([
  "registry",
  "transaction",
  "isolation",
  "readOnly",
  "timeoutMs",
  "name",
  "holdConnection",
]);

/** @internal Validate the options of `open()`; those of a block that do not apply are refused by name. */
export function resolveOpenOptions(options: unknown): ResolvedOptions {
  if (typeof options === "object" && options !== null) {
    for (const key of Object.keys(options)) {
      if (KNOWN.has(key) && !OPEN_KNOWN.has(key)) {
        throw new TypeError(
          `\`${key}\` does not apply to open(): an opened session is always a new one, on its own connection, ` +
            `that never joins another. Use a block (withSession/withTransaction) for \`${key}\`.`,
        );
      }
    }
  }
  return resolveOptions(options, undefined, false);
}

/**
 * @internal Validate block options. Throws `TypeError`/`RangeError` naming the
 * option and the value received.
 */
export function resolveOptions(
  options: unknown,
  fallbackName: string | undefined,
  transactional: boolean,
): ResolvedOptions {
  if (options === undefined || options === null) {
    return {
      registry: undefined,
      transaction: transactional,
      isolation: undefined,
      propagation: "required",
      savepoint: true,
      readOnly: false,
      durable: false,
      name: fallbackName,
      timeoutMs: undefined,
      retry: undefined,
      holdConnection: false,
    };
  }
  if (typeof options !== "object")
    throw new TypeError(`Expected session options to be an object, got ${describe(options)}`);
  for (const key of Object.keys(options)) {
    if (!KNOWN.has(key)) {
      throw new TypeError(`Unknown session option \`${key}\`; expected one of ${[...KNOWN].join(", ")}`);
    }
  }
  const o = options as SessionOptions;
  if (o.registry !== undefined && !isRegistry(o.registry)) {
    throw new TypeError(`Expected \`registry\` to be a SessionRegistry, got ${describe(o.registry)}`);
  }
  if (o.name !== undefined && typeof o.name !== "string") {
    throw new TypeError(`Expected \`name\` to be a string, got ${describe(o.name)}`);
  }
  const isolation = expectOneOf("isolation", o.isolation, ISOLATION_LEVELS);
  const readOnly = expectBoolean(o, "readOnly");
  const durable = expectBoolean(o, "durable");
  const savepoint = o.savepoint === undefined ? true : expectBoolean(o, "savepoint");
  const transaction =
    (o.transaction === undefined ? transactional : expectBoolean(o, "transaction") || transactional) ||
    isolation !== undefined ||
    readOnly ||
    durable;
  if (o.transaction === false && (isolation !== undefined || readOnly || durable)) {
    throw new TypeError(
      `\`transaction: false\` contradicts ${isolation !== undefined ? "`isolation`" : readOnly ? "`readOnly`" : "`durable`"}, which needs a transaction`,
    );
  }
  const retry = resolveRetry(o.retry);
  if (retry !== undefined && !transaction) {
    throw new TypeError(
      `\`retry\` re-runs a transaction, so it needs \`transaction: true\` (or withTransaction), got retry ${describe(o.retry)} without one`,
    );
  }
  return {
    registry: o.registry,
    transaction,
    isolation,
    propagation: expectOneOf("propagation", o.propagation, PROPAGATIONS) ?? "required",
    savepoint,
    readOnly,
    durable,
    name: o.name ?? fallbackName,
    timeoutMs: expectDuration("timeoutMs", o.timeoutMs),
    retry,
    holdConnection: expectBoolean(o, "holdConnection"),
  };
}

function expectDuration(key: string, value: unknown): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new RangeError(`Expected \`${key}\` to be a number of milliseconds above 0, got ${describe(value)}`);
  }
  return value;
}

function expectCount(key: string, value: unknown): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0) {
    throw new RangeError(`Expected \`${key}\` to be a whole number from 0 up, got ${describe(value)}`);
  }
  return value;
}

function resolveRetry(retry: unknown): ResolvedRetry | undefined {
  if (retry === undefined) return undefined;
  if (typeof retry === "number") {
    const retries = expectCount("retry", retry);
    return retries === 0 ? undefined : { retries, baseDelayMs: 10, maxDelayMs: 1000, retryOn: isRetryableError };
  }
  if (typeof retry !== "object" || retry === null) {
    throw new TypeError(
      `Expected \`retry\` to be a number or { retries, baseDelayMs?, maxDelayMs?, retryOn? }, got ${describe(retry)}`,
    );
  }
  const r = retry as RetryOptions;
  const retries = expectCount("retry.retries", r.retries);
  if (r.retryOn !== undefined && typeof r.retryOn !== "function") {
    throw new TypeError(`Expected \`retry.retryOn\` to be a function, got ${describe(r.retryOn)}`);
  }
  const baseDelayMs = r.baseDelayMs === undefined ? 10 : expectCount("retry.baseDelayMs", r.baseDelayMs);
  const maxDelayMs =
    r.maxDelayMs === undefined ? Math.max(1000, baseDelayMs) : expectCount("retry.maxDelayMs", r.maxDelayMs);
  if (retries === 0) return undefined;
  return { retries, baseDelayMs, maxDelayMs, retryOn: r.retryOn ?? isRetryableError };
}

/**
 * Whether an error is worth a new attempt of the whole transaction: a PostgreSQL
 * serialization failure (`40001`) or deadlock (`40P01`), a MySQL/MariaDB deadlock
 * (`1213`, `ER_LOCK_DEADLOCK`) or lock wait timeout (`1205`, `ER_LOCK_WAIT_TIMEOUT`),
 * or SQLite's `SQLITE_BUSY` (another connection, often another process, holds the
 * database lock beyond the busy timeout) and `SQLITE_LOCKED` (a table lock within the
 * same database), extended codes included (`SQLITE_BUSY_SNAPSHOT`,
 * `SQLITE_LOCKED_SHAREDCACHE`...), whether the driver says so in `code` (better-sqlite3's
 * `SqliteError`, node-sqlite3) or only in its message (`SQLITE_BUSY: database is locked`).
 * Looks through TypeORM's `QueryFailedError` at the driver's error (`driverError`), and
 * through `cause`.
 *
 * @param error - anything thrown
 * @returns `true` for those errors (also when wrapped as `driverError` or `cause`), else `false`
 * @example
 * ```ts
 * await withTransaction(work, { retry: { retries: 3, retryOn: (e) => isRetryableError(e) || e instanceof MyConflict } });
 * ```
 */
export function isRetryableError(error: unknown): boolean {
  for (let e: unknown = error, depth = 0; typeof e === "object" && e !== null && depth < 3; depth++) {
    const { code, errno, message } = e as { code?: unknown; errno?: unknown; message?: unknown };
    if (code === "40001" || code === "40P01") return true;
    // MySQL drivers (mysql2, mysql): numeric `errno`, symbolic `code`.
    if (errno === 1213 || errno === 1205) return true;
    if (code === "ER_LOCK_DEADLOCK" || code === "ER_LOCK_WAIT_TIMEOUT") return true;
    // SQLite drivers: the (extended) result code's name in `code`, or at the start of the message.
    if (typeof code === "string" && SQLITE_RETRYABLE_CODE.test(code)) return true;
    if (typeof message === "string" && SQLITE_RETRYABLE_MESSAGE.test(message)) return true;
    e = (e as { driverError?: unknown; cause?: unknown }).driverError ?? (e as { cause?: unknown }).cause;
  }
  return false;
}

/** `SQLITE_BUSY`, `SQLITE_LOCKED` and their extended codes (`SQLITE_BUSY_SNAPSHOT`...). */
const SQLITE_RETRYABLE_CODE = /^SQLITE_(BUSY|LOCKED)(_[A-Z]+)?$/;
/** node-sqlite3's messages: `SQLITE_BUSY: database is locked`. */
const SQLITE_RETRYABLE_MESSAGE = /^SQLITE_(BUSY|LOCKED)(_[A-Z]+)?:/;
