import type { SessionRegistry } from "../registry/registry.js";

/*
 * The options as users write them. Their validation is in option-checks.ts, what counts as
 * retryable in retry.ts.
 */

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

/**
 * Options of `registry.open()` and `openSession()`: those of a block that make sense
 * for a session the caller owns (it never joins another, so no `propagation`,
 * `savepoint`, `durable` or `retry`).
 *
 * @example
 * ```ts
 * const options: OpenOptions = { transaction: true, timeoutMs: 5_000, name: "import" };
 * await using session = await openSession(options);
 * ```
 */
export type OpenOptions = Pick<
  SessionOptions,
  "registry" | "transaction" | "isolation" | "readOnly" | "timeoutMs" | "name" | "holdConnection"
>;
