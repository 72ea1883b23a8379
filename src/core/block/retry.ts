/**
 * The retry of a transactional block: which errors are worth a new attempt, and the
 * loop that makes the attempts.
 */

/** @internal `retry` after validation, defaults applied. */
export interface ResolvedRetry {
  readonly retries: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
  readonly retryOn: (error: unknown) => boolean;
  /** A new attempt begins: forget the verdict on the last one (see {@link decidedOnce}). */
  readonly attemptBegins?: () => void;
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

/**
 * `retry` whose `retryOn` is asked once per failed attempt: the rollback (which drops the
 * attempt's callbacks) and the retry loop ask about the same error, and a user's `retryOn`
 * that counts or logs must see it once.
 *
 * @internal
 * @example
 * ```ts
 * const retry = decidedOnce(opts.retry); // one per block, shared by its attempts
 * ```
 */
export function decidedOnce(retry: ResolvedRetry): ResolvedRetry {
  let last: { error: unknown; verdict: boolean } | undefined;
  return {
    ...retry,
    retryOn: (error) => {
      if (last === undefined || last.error !== error) last = { error, verdict: retry.retryOn(error) };
      return last.verdict;
    },
    // The same error object thrown again by a later attempt is asked about again.
    attemptBegins: () => (last = undefined),
  };
}

/**
 * Re-run `attempt` on retryable errors with capped exponential backoff and jitter.
 *
 * @internal
 * @example
 * ```ts
 * return retrying(retry, (n) => runAttempt(n)); // n counts from 1
 * ```
 */
export async function retrying<T>(retry: ResolvedRetry, attempt: (n: number) => Promise<T>): Promise<T> {
  for (let n = 1; ; n++) {
    retry.attemptBegins?.();
    try {
      return await attempt(n);
    } catch (error) {
      if (n > retry.retries || !retry.retryOn(error)) throw error;
    }
    const delay = Math.min(retry.maxDelayMs, retry.baseDelayMs * 2 ** (n - 1)) * (0.5 + Math.random() / 2);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}
