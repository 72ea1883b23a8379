import type { DataSource, EntityManager, EntityTarget, ObjectLiteral, QueryRunner, Repository } from "typeorm";
import { PropagationError, SessionClosedError, SessionTimeoutError, TransactionNotActiveError } from "../errors.js";
import type { Lease } from "./lease.js";
import type { IsolationLevel } from "./options.js";
import type { SessionRegistry } from "./registry.js";
import { cancelStatement, canReconnect, reconnectable } from "./driver.js";
import { queueOf } from "./statement-queue.js";
import { type Frame, isWithin, lineage, type RequestEnd, scopeOf, storage } from "./scope.js";
import { discardConnection, type DriverFamily } from "./driver.js";

/** A callback registered with {@link Session.afterCommit} or {@link Session.afterRollback}. */
export type SessionCallback = () => unknown;

/** What a transactional block asks of the transaction it opens or joins. */
export interface LevelSpec {
  readonly isolation: IsolationLevel | undefined;
  readonly readOnly: boolean;
  readonly durable: boolean;
  readonly savepoint: boolean;
  readonly name: string | undefined;
  readonly attempt?: number | undefined;
  /** The transaction of useTransactionalTests(): invisible to the code under test. */
  readonly invisible?: boolean;
  /** With `invisible`: run `afterCommit` callbacks when a block's savepoint is released. */
  readonly runAfterCommit?: boolean;
}

/**
 * One open transaction or savepoint of a session. The frame that opened it owns
 * it: only work running inside that frame may use the session until it ends.
 */
interface Level {
  readonly owner: Frame | undefined;
  readonly savepoint: boolean;
  readonly readOnly: boolean;
  readonly startedAt: number;
  afterCommit: SessionCallback[] | undefined;
  afterRollback: SessionCallback[] | undefined;
  beforeCommit: SessionCallback[] | undefined;
  /** Name of an inner block that failed inside this level with `savepoint: false`. */
  rollbackOnly: string | undefined;
  /** The BEGIN or SAVEPOINT has been executed (until then there is nothing to undo). */
  begun: boolean;
  /** Rolled back by the session closing or discarding its connection, not by its owner. */
  forced: boolean;
  /** The COMMIT or ROLLBACK under way, so that no one ends the level twice. */
  ending: Promise<LevelOutcome> | undefined;
  /** The outer transaction of useTransactionalTests(): blocks inside it behave as outermost. */
  readonly invisible: boolean;
  readonly runAfterCommit: boolean;
  /** The attempt (from 1) of a block run with `retry`, for the events. */
  readonly attempt: number | undefined;
  ended: "committed" | "rolledBack" | undefined;
}

/** What {@link Session._enter} gives a block: the level it opened, or the one it joined. */
interface Handle {
  readonly level: Level;
  readonly joined: boolean;
}

/** @internal Opaque to blocks: pass it back to `_exit` and `_markRollbackOnly`. */
export type LevelHandle = object;

/** @internal What a finished level leaves to do: callbacks to run and an error to throw. */
export interface LevelOutcome {
  readonly callbacks: SessionCallback[];
  readonly error?: unknown;
}

/** @internal The registry's side of a session: shared resources, events and counters. */
export interface SessionHost {
  readonly dataSource: DataSource;
  readonly family: DriverFamily;
  /** The connection lease of single-connection drivers (SQLite), shared per DataSource. */
  readonly lease: Lease<Session> | undefined;
  emit(event: "connect" | "begin" | "commit" | "rollback" | "close", session: Session, extra?: object): void;
  reportError(session: Session, error: unknown): void;
  closed(session: Session, durationMs: number): void;
  /** A closed request session is used again: count it as open; false while the registry drains. */
  reopened(session: Session): boolean;
  /** The EntityManager bound to a session's runner view (made once per runner). */
  manager(runner: QueryRunner, session: Session): EntityManager;
}

const OPEN = 0;
const CLOSING = 1;
const CLOSED = 2;

const NOTHING_ROLLED_BACK: Promise<SessionCallback[]> = Promise.resolve([]);

let lastId = 0;

/**
 * @internal On a callback: what to call instead when the callback is dropped without
 * running (the `afterRollback` callbacks of a failed attempt that `retry` re-runs).
 */
export const DROPPED = Symbol("typeorm-scoped-session.dropped");

/** On a session's runner view and EntityManager: the session they belong to. */
export const OWNER = Symbol("typeorm-scoped-session.owner");

/** A session's view of the driver's QueryRunner. */
type RunnerView = QueryRunner & { [OWNER]: Session };

/**
 * One unit of work's database session: one TypeORM `QueryRunner` (one pooled
 * connection) and an `EntityManager` bound to it.
 *
 * A session is lazy: it takes a connection on its first statement or
 * transaction, never before. It is created and removed by a block
 * ({@link withSession}, {@link withTransaction}, a decorated method, a
 * middleware) and must not be used after that block has settled.
 *
 * @example
 * ```ts
 * await withSession(async (s) => {
 *   const user = await s.getRepository(User).findOneByOrFail({ id });
 *   await s.query("UPDATE counters SET n = n + 1 WHERE id = $1", [user.id]);
 * });
 * ```
 */
export class Session {
  /** Process-wide unique number, handy in logs. */
  readonly id: number;
  /** @internal The session of useTransactionalTests(). */
  _test = false;
  /** The block's label (its `name` option or method name), if any. */
  readonly name: string | undefined;
  /** The registry that created this session. */
  readonly registry: SessionRegistry;

  readonly #host: SessionHost;
  #openedAt = performance.now();
  #state = OPEN;
  /** Frame that runs the final COMMIT/ROLLBACK: its work is allowed while closing. */
  #closer: Frame | undefined;
  #closing: Promise<SessionCallback[]> | undefined;
  #real: QueryRunner | undefined;
  #runner: QueryRunner | undefined;
  #manager: EntityManager | undefined;
  #connected: Promise<void> | boolean = false;
  #broken: unknown;
  #abort: AbortController | undefined;
  readonly #levels: Level[] = [];
  /** Levels TypeORM began through the runner view, to be ended by its commit/rollback calls. */
  #viewLevels: Level[] = [];
  #waiters: { frame: Frame | undefined; grant: () => void }[] = [];
  /** The BEGIN or SAVEPOINT in flight, if any: closing waits for it. */
  #starting: Promise<void> | undefined;
  /** `afterCommit` callbacks run at once (outside a transaction) that have not finished. */
  readonly #running = new Set<Promise<void>>();
  /** Why the session was force-closed (it timed out, or the registry was drained). */
  #killed: Error | undefined;
  /**
   * Statements let through and not answered yet: waited for before a COMMIT or
   * ROLLBACK (and on PostgreSQL cancelled first on a timeout).
   */
  readonly #inFlight = new Set<Promise<unknown>>();
  /** Blocks waiting on this session that must settle at once if it is force-closed. */
  #guards: Set<(error: unknown, closed: Promise<void>) => void> | undefined;
  /** Statements run so far (see {@link statements}). */
  #statements = 0;
  /** Statements of this session queued or in flight on a pooled connection: they keep it. */
  #uses = 0;
  /** Keep the pooled connection from first use until the session closes (`holdConnection`). */
  #pinned = false;
  /** The pooled connection going back to the pool. */
  #releasing: Promise<void> | undefined;
  /** The view's handler: what users assigned on the runner view. */
  #handler: { assigned(key: string): ((...args: unknown[]) => unknown) | undefined } | undefined;
  /** The driver runner as the session's own transaction statements see it (see {@link #transaction}). */
  #controlView: QueryRunner | undefined;
  /** Calls of the session's own that wait to come back through a wrapper the user assigned on the view. */
  readonly #pending = new Set<PropertyKey>();
  /**
   * SQLite: the BEGIN on its way is of a transaction that may write, and goes out as
   * `BEGIN IMMEDIATE TRANSACTION` (see {@link #controlRunner}).
   */
  #immediate = false;
  /** A request's session once its request is over: it closes as soon as nothing of it runs. */
  #requestOver: RequestEnd | undefined;
  /** Closed (or closing) only because its request was over and nothing of it ran: it may reopen. */
  #idleClosed = false;
  /** Set on a session from `open()`, which its caller closes: stops its timeout. */
  #callerOwned: (() => void) | undefined;
  /** Blocks of an ended request still running on this session. */
  #busy = 0;

  /** Sessions are created by registries, never directly. */
  private constructor(registry: SessionRegistry, host: SessionHost, name: string | undefined) {
    this.id = ++lastId;
    this.name = name;
    this.registry = registry;
    this.#host = host;
  }

  /** @internal */
  static _create(registry: SessionRegistry, host: SessionHost, name: string | undefined): Session {
    return new Session(registry, host, name);
  }

  /** `session #id (name)`, as used in error messages. */
  toString(): string {
    return `session #${this.id}${this.name === undefined ? "" : ` (${this.name})`}`;
  }

  /**
   * The `EntityManager` bound to this session's connection. Every call through it
   * (and through repositories obtained from it) runs on this session.
   */
  get manager(): EntityManager {
    if (this.#manager === undefined) this.#createRunner();
    return this.#manager!;
  }

  /**
   * The session's `QueryRunner`, as an escape hatch for TypeORM APIs that take
   * one. Its transaction methods map to {@link begin}/{@link commit}/{@link rollback};
   * its `release()` does nothing, because the session's block releases it.
   */
  get queryRunner(): QueryRunner {
    if (this.#runner === undefined) this.#createRunner();
    return this.#runner!;
  }

  /**
   * A repository bound to this session.
   *
   * @param target - the entity class, schema or name
   * @example
   * ```ts
   * const users = s.getRepository(User);
   * ```
   */
  getRepository<E extends ObjectLiteral>(target: EntityTarget<E>): Repository<E> {
    return this.manager.getRepository(target);
  }

  /**
   * Run raw SQL on this session's connection.
   *
   * @param sql - the statement, with the driver's placeholders (`$1` on PostgreSQL, `?` on SQLite)
   * @param parameters - values for the placeholders
   * @throws {@link SessionClosedError} (as a rejection) when the session is closing or closed
   * @example
   * ```ts
   * const rows = await s.query<{ n: number }[]>("SELECT count(*) AS n FROM users");
   * ```
   */
  query<T = any>(sql: string, parameters?: unknown[]): Promise<T> {
    // A `query` assigned on `s.queryRunner` (a spy, an APM wrapper) sees these too.
    const assigned = this.#handler?.assigned("query");
    if (assigned !== undefined) return Promise.resolve(assigned.call(this.#runner, sql, parameters) as T);
    return this.#statement(sql, parameters, false) as Promise<T>;
  }

  /**
   * How many statements the session has sent so far (queries, and the BEGIN, COMMIT,
   * ROLLBACK and SAVEPOINT statements of its transactions are not counted).
   */
  get statements(): number {
    return this.#statements;
  }

  /** Whether a transaction is open on this session. */
  get inTransaction(): boolean {
    return this.#visibleLevels() > 0;
  }

  /** Whether the session has been closed (or is closing) and accepts no new work. */
  get closed(): boolean {
    return this.#state !== OPEN || this.#broken !== undefined;
  }

  /**
   * Aborted when the session closes (its block settled, it was removed or force
   * closed). Pass it to `fetch` and other cancellable work started by the block.
   */
  get signal(): AbortSignal {
    if (this.#abort === undefined) {
      this.#abort = new AbortController();
      if (this.#state === CLOSED) this.#abort.abort(this.#closedError());
    }
    return this.#abort.signal;
  }

  /**
   * Begin a transaction, or a SAVEPOINT when one is already open.
   *
   * Prefer {@link withTransaction}, which also commits or rolls back for you.
   *
   * @param isolation - isolation level; not allowed when a transaction is already open
   * @throws {@link PropagationError} (as a rejection) when `isolation` is given inside an open transaction
   * @example
   * ```ts
   * await s.begin("SERIALIZABLE");
   * try { await work(s); await s.commit(); } catch (e) { await s.rollback(); throw e; }
   * ```
   */
  async begin(isolation?: IsolationLevel): Promise<void> {
    await this._enter(storage.getStore(), {
      isolation,
      readOnly: false,
      durable: false,
      savepoint: true,
      name: undefined,
    });
  }

  /**
   * Commit the innermost open transaction (RELEASE its savepoint when nested), then
   * run its `afterCommit` callbacks if it was the outermost one.
   *
   * @throws {@link TransactionNotActiveError} (as a rejection) when no transaction is open
   */
  async commit(): Promise<void> {
    const top = this.#ownTop("commit");
    const handle: Handle = { level: top, joined: false };
    try {
      await this._beforeCommit(handle);
    } catch (error) {
      await this._runCallbacks((await this._exit(handle, false)).callbacks);
      throw error;
    }
    const outcome = await this._exit(handle, true);
    await this._runCallbacks(outcome.callbacks);
    if ("error" in outcome) throw outcome.error;
  }

  /**
   * Roll back the innermost open transaction (to its savepoint when nested), then
   * run its `afterRollback` callbacks.
   *
   * @throws {@link TransactionNotActiveError} (as a rejection) when no transaction is open
   */
  async rollback(): Promise<void> {
    const top = this.#ownTop("rollback");
    const outcome = await this._exit({ level: top, joined: false } satisfies Handle, false);
    await this._runCallbacks(outcome.callbacks);
  }

  /**
   * Run `callback` once the outermost transaction has committed, before the block
   * settles. Dropped if the transaction, or the savepoint it was registered in,
   * rolls back. Outside a transaction it runs at once. A callback that throws is
   * reported through the registry's `error` event and does not change the block's
   * result.
   *
   * @example
   * ```ts
   * await withTransaction(async (s) => {
   *   await s.getRepository(Order).save(order);
   *   s.afterCommit(() => mailer.send(order.confirmation()));
   * });
   * ```
   */
  afterCommit(callback: SessionCallback): void {
    assertCallback(callback, "afterCommit");
    const frame = storage.getStore();
    this.#assertUsable(frame);
    const level = this.#levelOf(frame);
    if (level === undefined || level.invisible) {
      if (level?.runAfterCommit === false) return;
      const running = this._runCallbacks([callback]);
      this.#running.add(running);
      void running.finally(() => this.#running.delete(running));
      return;
    }
    (level.afterCommit ??= []).push(callback);
  }

  /**
   * Run `callback` after the transaction (or the savepoint) it was registered in
   * rolls back, before the block settles. Outside a transaction it is never called.
   *
   * @param callback - called with no arguments; may return a promise, which is awaited
   * @throws TypeError when `callback` is not a function
   * @throws {@link SessionClosedError} when the session is closing or closed
   * @example
   * ```ts
   * s.afterRollback(() => metrics.increment("checkout.rolled_back"));
   * ```
   */
  afterRollback(callback: SessionCallback): void {
    assertCallback(callback, "afterRollback");
    const frame = storage.getStore();
    this.#assertUsable(frame);
    const level = this.#levelOf(frame);
    if (level !== undefined && !level.invisible) (level.afterRollback ??= []).push(callback);
  }

  /**
   * Run `callback` inside the outermost transaction, just before its COMMIT, after the
   * block's body (callbacks run in the order registered and are awaited; they may run
   * statements, which belong to the transaction). One that throws rolls the
   * transaction back, and the block rejects with its error. Registered inside a
   * savepoint, it is dropped if that savepoint rolls back.
   *
   * @param callback - called with no arguments; may return a promise, which is awaited
   * @throws TypeError when `callback` is not a function
   * @throws {@link TransactionNotActiveError} outside a transaction
   * @throws {@link SessionClosedError} when the session is closing or closed
   * @example
   * ```ts
   * await withTransaction(async (s) => {
   *   s.beforeCommit(() => s.query("SELECT check_ledger_balanced()"));
   *   await s.getRepository(Entry).save(entries);
   * });
   * ```
   */
  beforeCommit(callback: SessionCallback): void {
    assertCallback(callback, "beforeCommit");
    const frame = storage.getStore();
    this.#assertUsable(frame);
    const level = this.#levelOf(frame);
    if (level === undefined || level.invisible) throw new TransactionNotActiveError(String(this), "beforeCommit");
    (level.beforeCommit ??= []).push(callback);
  }

  /**
   * Run `fn` in a scope whose session is this one, so that `currentSession()`, the
   * registry's proxies and blocks inside `fn` (which join it) see it: the way to hand
   * a session from {@link SessionRegistry.open} to code written for scopes.
   *
   * @param fn - the code to run; may return a promise
   * @returns what `fn` returns (a rejection when `fn` throws)
   * @throws TypeError (as a rejection) when `fn` is not a function
   * @throws {@link SessionClosedError} (as a rejection) when the session is closing or closed
   * @example
   * ```ts
   * await using s = await db.open({ transaction: true });
   * await s.run(() => importInvoices(file)); // importInvoices() uses db.getRepository(Invoice)
   * await s.commit();
   * ```
   */
  run<T>(fn: () => T | Promise<T>): Promise<T> {
    try {
      if (typeof fn !== "function")
        throw new TypeError(`Expected the body of run() to be a function, got ${typeof fn}`);
      const here = storage.getStore();
      this.#assertUsable(here);
      return Promise.resolve(storage.run({ scope: scopeOf(here, this), parent: here }, fn));
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /**
   * Close a session from {@link SessionRegistry.open}: roll back what is uncommitted,
   * release the connection, run the `afterRollback` callbacks, abort {@link signal}.
   * Idempotent. A session that a block, a scope or a request owns is closed by its
   * owner instead.
   *
   * @throws {@link PropagationError} (as a rejection) on a session that a block owns
   * @example
   * ```ts
   * const s = await db.open();
   * try {
   *   await s.getRepository(User).save(user);
   * } finally {
   *   await s.close();
   * }
   * ```
   */
  async close(): Promise<void> {
    const stop = this.#callerOwned;
    if (stop === undefined) {
      throw new PropagationError(
        `${String(this)} belongs to the block, scope or request that opened it, which removes it when it ` +
          `settles: close() is for sessions from registry.open() or openSession(). To end a scope's session ` +
          `early, call registry.remove() inside the scope.`,
      );
    }
    stop();
    await this._runCallbacks(await this._close());
  }

  /**
   * {@link close}, for `await using s = await db.open()`.
   *
   * @example
   * ```ts
   * {
   *   await using s = await db.open();
   *   await s.query("SELECT 1");
   * } // closed here
   * ```
   */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // ---------------------------------------------------------------------------
  // Used by blocks and the registry. Not part of the public API.

  /** @internal Whether work from `frame` is still accepted (open, or the closing block itself). */
  _usableFrom(frame: Frame | undefined): boolean {
    if (this.#broken !== undefined) return false;
    if (this.#state === OPEN) return true;
    if (this.#state === CLOSED && this.#idleClosed) return this.#reopen();
    return this.#state === CLOSING && this.#closer !== undefined && isWithin(frame, this.#closer);
  }

  /** @internal The error for work that arrives too late. */
  _closedError(): SessionClosedError {
    return this.#closedError();
  }

  /** @internal Whether this session holds an open transaction on `lease`. */
  _holdsTransactionOn(lease: Lease<Session>): boolean {
    return this.#levels.length > 0 && this.#host.lease === lease;
  }

  /** Open levels the code under test can see (all of them, outside useTransactionalTests()). */
  #visibleLevels(): number {
    return this.#levels.length - (this.#levels[0]?.invisible === true ? 1 : 0);
  }

  /**
   * @internal Open a transaction level for a block running in `frame`: a
   * transaction, a savepoint, or a join of the enclosing one (`savepoint: false`).
   * Waits while another block of this session owns the open transaction.
   */
  _enter(frame: Frame | undefined, spec: LevelSpec): Promise<LevelHandle> {
    const reopening = this.#reopening();
    if (reopening !== undefined) return reopening.then(() => this._enter(frame, spec));
    if (!this._usableFrom(frame)) return Promise.reject(this.#closedError());
    if (this.#mayRun(frame)) {
      try {
        return this.#start(this.#push(frame, spec), spec);
      } catch (error) {
        return Promise.reject(error);
      }
    }
    return new Promise<LevelHandle>((resolve, reject) => {
      this.#waiters.push({
        frame,
        grant: () => {
          try {
            if (!this._usableFrom(frame)) throw this.#closedError();
            resolve(this.#start(this.#push(frame, spec), spec));
          } catch (error) {
            reject(error);
          }
        },
      });
    });
  }

  /**
   * @internal End what {@link _enter} opened: commit (or release the savepoint)
   * or roll back. A join ends nothing. Never rejects: failures come back as `error`.
   */
  async _exit(handle: LevelHandle, commit: boolean): Promise<LevelOutcome> {
    const { level, joined } = handle as Handle;
    if (joined) return { callbacks: [] };
    if (level.ended !== undefined || level.ending !== undefined) {
      // Ended, or being ended by the session closing: wait for that, never end it twice.
      await level.ending;
      if (commit && level.forced) {
        return { callbacks: [], error: this.#closedError("its transaction was rolled back when it closed") };
      }
      return { callbacks: [] };
    }
    return this.#asCloser(async () => {
      // Levels opened above this one and left open (a begin() without commit) are undone.
      const callbacks: SessionCallback[] = [];
      while (this.#levels.length > 0 && this.#levels.at(-1) !== level && level.ended === undefined) {
        callbacks.push(...(await this.#end(this.#levels.at(-1)!, false)).callbacks);
      }
      if (level.ended !== undefined) return { callbacks, error: this.#closedError() };
      const outcome = await this.#end(level, commit);
      return callbacks.length === 0 ? outcome : { ...outcome, callbacks: [...callbacks, ...outcome.callbacks] };
    });
  }

  /** @internal This session comes from `open()`: its caller closes it; `stop` ends its timeout. */
  _ownByCaller(stop: () => void): void {
    this.#callerOwned = stop;
  }

  /**
   * @internal A block's body has resolved: run the `beforeCommit` callbacks of its level
   * if its COMMIT is the outermost one (to the code under test). They may add more.
   */
  async _beforeCommit(handle: LevelHandle): Promise<void> {
    const { level, joined } = handle as Handle;
    if (joined) return;
    if (level.savepoint && this.#levels[this.#levels.indexOf(level) - 1]?.invisible !== true) return;
    for (let next = level.beforeCommit?.shift(); next !== undefined; next = level.beforeCommit?.shift()) {
      await next();
    }
  }

  /** @internal A block that joined with `savepoint: false` failed: the joined level must not commit. */
  _markRollbackOnly(handle: LevelHandle, name: string | undefined): void {
    const { level, joined } = handle as Handle;
    if (joined) level.rollbackOnly ??= name ?? "an anonymous block";
  }

  /**
   * @internal The session's final COMMIT or ROLLBACK starts: from now on only work
   * that runs inside that cleanup (the `closer` frame) may use the session.
   */
  _markClosing(): void {
    if (this.#state !== OPEN) return;
    this.#state = CLOSING;
    // Inside the cleanup, the session is its own scope: TypeORM subscribers that run
    // during the final COMMIT or ROLLBACK may use it, and see it as current.
    this.#closer = { scope: { registry: this.registry, session: this, ended: false }, parent: storage.getStore() };
    this.#host.lease?.cancel(this, () => this.#closedError());
    this.#wake();
  }

  /**
   * @internal Close at once, without a promise, a session that never took its
   * runner and has nothing under way (the body never touched the database): the
   * common case of {@link _close}, kept cheap. False when there is more to do.
   */
  _closeIdle(): boolean {
    if (
      this.#state !== OPEN ||
      this.#connected !== false ||
      this.#releasing !== undefined ||
      this.#levels.length > 0 ||
      this.#waiters.length > 0 ||
      this.#running.size > 0
    ) {
      return false;
    }
    this.#state = CLOSED;
    this.#closing = NOTHING_ROLLED_BACK;
    this.#abort?.abort(this.#closedError());
    this.#host.closed(this, performance.now() - this.#openedAt);
    return true;
  }

  /**
   * @internal Close the session: roll back what is open, release the connection,
   * abort the signal. Idempotent. Resolves to the `afterRollback` callbacks of what
   * was rolled back.
   */
  _close(): Promise<SessionCallback[]> {
    // The callbacks go to the first caller only, so that they run once.
    if (this.#closing !== undefined) return this.#closing.then(() => []);
    this.#closing = this.#closeOnce();
    return this.#closing;
  }

  /**
   * @internal Force the session closed now (a timeout, a drain): make the blocks
   * waiting on it reject, cancel the statement PostgreSQL is running for it, roll
   * back, release.
   */
  async _kill(reason: Error): Promise<void> {
    if (this.#state === CLOSED) return;
    this.#killed ??= reason;
    this.#idleClosed = false;
    const killing = (async () => {
      if (this.#inFlight.size > 0) await this.#cancelStatement();
      await this._runCallbacks(await this._close());
    })();
    // The blocks settle with this reason once the session is closed, whatever the
    // abandoned body runs into meanwhile.
    const error = reason instanceof SessionTimeoutError ? reason : this.#closedError();
    for (const settleNow of this.#guards ?? []) settleNow(error, killing);
    await killing;
  }

  /**
   * @internal The outcome of a block's body, unless the session is force-closed
   * first: then the block rejects with the reason once the session is closed, and
   * the body is abandoned.
   */
  _guard<T>(outcome: T | Promise<T>): Promise<T> {
    if (!(outcome instanceof Promise)) return Promise.resolve(outcome);
    return new Promise<T>((resolve, reject) => {
      let killed = false;
      const guard = (error: unknown, closed: Promise<void>): void => {
        killed = true;
        void closed.then(() => reject(error));
      };
      const guards = (this.#guards ??= new Set());
      guards.add(guard);
      outcome.then(
        (value) => {
          guards.delete(guard);
          if (!killed) resolve(value);
        },
        (error: unknown) => {
          guards.delete(guard);
          if (!killed) reject(error);
        },
      );
    });
  }

  /**
   * @internal The session's request is over (`fresh`: it was made after that): close
   * it as soon as nothing of it runs — no block, statement, transaction or callback.
   */
  _closeWhenIdle(reason: RequestEnd, fresh: boolean): void {
    this.#requestOver = reason;
    // A session made for one late use closes after it; give that use its chance first.
    if (fresh) setImmediate(() => this.#closeIfIdle());
    else this.#closeIfIdle();
  }

  /** @internal `holdConnection`: keep the pooled connection, once taken, until the session closes. */
  _holdConnection(): void {
    this.#pinned = true;
  }

  /** @internal A block of an ended request runs on this session: it stays open until `work` settles. */
  _busyWith<T>(work: Promise<T>): Promise<T> {
    this.#busy += 1;
    const done = (): void => {
      this.#busy -= 1;
      this.#closeIfIdle();
    };
    work.then(done, done);
    return work;
  }

  #closeIfIdle(): void {
    if (
      this.#requestOver === undefined ||
      this.#state !== OPEN ||
      this.#busy > 0 ||
      this.#inFlight.size > 0 ||
      this.#levels.length > 0 ||
      this.#starting !== undefined
    ) {
      return;
    }
    this.#idleClosed = true;
    if (!this._closeIdle()) void this._close().then((callbacks) => this._runCallbacks(callbacks));
  }

  /**
   * A request's session that closed once idle, after its request was over, is used
   * again through a reference kept from before (`const s = currentSession()` in a
   * handler that goes on after the client left): like SQLAlchemy's Session after
   * `close()`, it starts afresh, and closes again as soon as that work is done. Not
   * after a timeout, a drain or a discarded connection.
   */
  #reopen(): boolean {
    const real = this.#real;
    const pooled = real !== undefined && this.#host.lease === undefined;
    if (pooled && this.#connected !== false && !canReconnect(real)) return false;
    if (!this.#host.reopened(this)) return false;
    if (pooled && this.#connected !== false) {
      reconnectable(real);
      this.#connected = false;
    }
    this.#idleClosed = false;
    this.#state = OPEN;
    this.#closing = undefined;
    this.#closer = undefined;
    this.#openedAt = performance.now();
    // Nothing may keep it open now: close it again once this use is over.
    setImmediate(() => this.#closeIfIdle());
    return true;
  }

  /** The session is closing only because its request is over and it was idle: wait for that, then reopen. */
  #reopening(): Promise<void> | undefined {
    return this.#state === CLOSING && this.#idleClosed ? this.#closing!.then(() => undefined) : undefined;
  }

  /** @internal Whether the session is still waiting for its connection (the pool, or SQLite's lease). */
  _waitingForConnection(): boolean {
    if (this.#connected instanceof Promise) return true;
    const lease = this.#host.lease;
    return lease !== undefined && this.#levels.length > 0 && lease.holder !== this;
  }

  /** @internal Run callbacks in order, reporting failures through `error`. */
  async _runCallbacks(callbacks: readonly SessionCallback[]): Promise<void> {
    if (callbacks.length === 0) return;
    for (const callback of callbacks) {
      try {
        await callback();
      } catch (error) {
        this.#host.reportError(this, error);
      }
    }
  }

  // ---------------------------------------------------------------------------

  async #closeOnce(): Promise<SessionCallback[]> {
    this._markClosing();
    const callbacks: SessionCallback[] = [];
    let handedBack: Promise<void> | undefined;
    await this.#asCloser(async () => {
      // A BEGIN or SAVEPOINT in flight finishes first, so that it is undone below; so do
      // statements in flight (cancelled first on a timeout), ahead of the ROLLBACK.
      while (this.#starting !== undefined) await this.#starting;
      await this.#answered();
      while (this.#levels.length > 0 && this.#broken === undefined) {
        const top = this.#levels.at(-1)!;
        top.forced = true;
        if (top.begun || top.ending !== undefined) callbacks.push(...(await this.#end(top, false)).callbacks);
        else this.#pop(top, "rolledBack"); // still waiting for the connection: nothing to undo
      }
      if (this.#releasing !== undefined) await this.#releasing;
      const real = this.#real;
      if (
        real !== undefined &&
        this.#connected !== false &&
        this.#broken === undefined &&
        this.#host.lease === undefined
      ) {
        const release = async (): Promise<void> => {
          try {
            await real.release();
          } catch (error) {
            this.#host.reportError(this, error);
          }
        };
        // The pool has not handed the connection over yet (a timeout or a drain while
        // waiting for it): give it back as soon as it does, without holding the block up;
        // releasing before would leave it checked out for good.
        if (this.#connected instanceof Promise) handedBack = this.#connected.then(release, () => undefined);
        else await release();
      }
    });
    this.#host.lease?.releaseAll(this);
    while (this.#running.size > 0) await Promise.all(this.#running);
    this.#state = CLOSED;
    this.#abort?.abort(this.#closedError());
    this.#wake();
    // The registry counts the session as open until its connection is back in the pool.
    const closed = (): void => this.#host.closed(this, performance.now() - this.#openedAt);
    if (handedBack === undefined) closed();
    else void handedBack.then(closed);
    return callbacks;
  }

  #asCloser<T>(fn: () => Promise<T>): Promise<T> {
    return this.#state === CLOSING && this.#closer !== undefined ? storage.run(this.#closer, fn) : fn();
  }

  #closedError(detail?: string): SessionClosedError {
    if (detail === undefined && this.#killed !== undefined) detail = this.#killed.message;
    if (detail === undefined && this.#broken !== undefined) {
      detail = "its connection was discarded after a failed COMMIT or ROLLBACK";
    }
    const reason = detail === undefined ? this.#requestOver : undefined;
    return new SessionClosedError(String(this), detail, reason);
  }

  /**
   * The innermost level, if the caller may end it: a late continuation must not
   * end the transaction of the block that is committing, nor a sibling block's.
   */
  #ownTop(action: string): Level {
    const frame = storage.getStore();
    this.#assertUsable(frame);
    const top = this.#levels.at(-1);
    if (top === undefined || !this.#mayRun(frame)) throw new TransactionNotActiveError(String(this), action);
    return top;
  }

  /** The innermost level that work from `frame` belongs to, if any. */
  #levelOf(frame: Frame | undefined): Level | undefined {
    for (let i = this.#levels.length - 1; i >= 0; i--) {
      const level = this.#levels[i]!;
      if (level.owner === undefined || isWithin(frame, level.owner)) return level;
    }
    return undefined;
  }

  #assertUsable(frame: Frame | undefined): void {
    if (!this._usableFrom(frame)) throw this.#closedError();
  }

  /**
   * Work from `frame` may run unless a transaction level owned by another block is
   * open; the session's own cleanup always may.
   */
  #mayRun(frame: Frame | undefined): boolean {
    const top = this.#levels.at(-1);
    if (top === undefined || top.owner === undefined || isWithin(frame, top.owner)) return true;
    return this.#state === CLOSING && this.#closer !== undefined && isWithin(frame, this.#closer);
  }

  /** Wait until {@link #wake} lets work from `frame` run (or the session closes). */
  #turn(frame: Frame | undefined): Promise<void> {
    return new Promise<void>((grant) => this.#waiters.push({ frame, grant }));
  }

  /** Wake waiters that may run now, in order; a granted level changes who may run next. */
  #wake(): void {
    if (this.#requestOver !== undefined) this.#closeIfIdle();
    if (this.#waiters.length === 0) return;
    const waiting = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiting) {
      if (this.#state !== OPEN || this.#mayRun(waiter.frame)) waiter.grant();
      else this.#waiters.push(waiter);
    }
  }

  /**
   * The entry points of a session's runner view, shared by every view: each finds
   * its session through {@link OWNER}. Everything TypeORM does with the view is
   * gated, counted and scoped; reads fall through to the driver's runner; nothing of
   * TypeORM is patched.
   */
  static readonly #viewEntries = new Map<PropertyKey, PropertyDescriptor>(
    Object.entries({
      query: {
        value(this: RunnerView, sql: string, parameters?: unknown[], structured?: boolean) {
          const session = this[OWNER];
          // The session's own BEGIN/COMMIT... coming back through a wrapper the user assigned.
          if (session.#pending.delete("query")) return session.#controlStatement(sql, parameters, structured === true);
          return session.#statement(sql, parameters, structured === true);
        },
      },
      stream: {
        async value(this: RunnerView, ...args: Parameters<QueryRunner["stream"]>) {
          const session = this[OWNER];
          // A stream reads from its connection until it ends: the session keeps it until it closes.
          if (session.#host.lease === undefined) await session.#gatePooled(storage.getStore());
          return session.#real!.stream(...args);
        },
      },
      connect: {
        async value(this: RunnerView) {
          // Asked for the connection itself (LISTEN, COPY, a driver API): the session keeps it until it closes.
          const session = this[OWNER];
          session.#assertUsable(storage.getStore());
          session.#pinned = true;
          await session.#connect();
          return session.#real!.connect();
        },
      },
      release: { value: () => Promise.resolve() },
      startTransaction: {
        value(this: RunnerView, isolation?: IsolationLevel) {
          const session = this[OWNER];
          if (session.#pending.delete("startTransaction")) return session.#driverCall("startTransaction", [isolation]);
          return session.#viewBegin(isolation);
        },
      },
      commitTransaction: {
        value(this: RunnerView) {
          const session = this[OWNER];
          if (session.#pending.delete("commitTransaction")) return session.#driverCall("commitTransaction", []);
          return session.#viewEnd(true);
        },
      },
      rollbackTransaction: {
        value(this: RunnerView) {
          const session = this[OWNER];
          if (session.#pending.delete("rollbackTransaction")) return session.#driverCall("rollbackTransaction", []);
          return session.#viewEnd(false);
        },
      },
      isTransactionActive: {
        get(this: RunnerView) {
          const session = this[OWNER];
          return session.#visibleLevels() > 0 && session.#mayRun(storage.getStore());
        },
      },
      isReleased: { get: () => false },
    } satisfies PropertyDescriptorMap),
  );

  /**
   * The view is a proxy over the driver's runner, which stays an ordinary object: it
   * answers with {@link #viewEntries}, its session and the session's broadcaster, and
   * reads everything else on the runner. (A view made by inheriting from the runner
   * would turn the runner into a prototype: a one-of-a-kind, slow shape for all of
   * TypeORM's code that runs on it, made slower still by every write to it.) What
   * TypeORM writes through the view goes to the runner, except on SQLite's one shared
   * runner, where it stays with the session: `data`, and the state that `release()`
   * resets on a runner of one's own (`loadedTables`, `sqlInMemory`), start fresh for
   * each session. Methods that users assign on the view (spies, wrappers of APM
   * agents) stay with the view and are what it answers with from then on.
   */
  static readonly #ViewHandler = class ViewHandler implements ProxyHandler<QueryRunner> {
    readonly session: Session;
    readonly #shared: boolean;
    readonly #own = new Map<PropertyKey, unknown>();
    constructor(session: Session, real: QueryRunner, shared: boolean) {
      this.session = session;
      this.#shared = shared;
      if (shared) {
        const SqlInMemory = (real as unknown as { sqlInMemory: object }).sqlInMemory.constructor as new () => unknown;
        this.#own.set("data", {});
        this.#own.set("loadedTables", []);
        this.#own.set("sqlInMemory", new SqlInMemory());
        this.#own.set("sqlMemoryMode", false);
      }
    }

    /** The method the user assigned under `key`, if any. */
    assigned(key: string): ((...args: unknown[]) => unknown) | undefined {
      const value = this.#own.get(key);
      return typeof value === "function" ? (value as (...args: unknown[]) => unknown) : undefined;
    }

    #keeps(key: PropertyKey): boolean {
      return this.#shared || Session.#viewEntries.get(key)?.value !== undefined;
    }

    get(real: QueryRunner, key: PropertyKey, view: unknown): unknown {
      if (key === OWNER) return this.session;
      if (key === "broadcaster") return this.session.#broadcaster;
      const entry = Session.#viewEntries.get(key);
      if (entry?.get !== undefined) return entry.get.call(view);
      const own = this.#own;
      if (own.has(key)) return own.get(key);
      if (entry !== undefined) return entry.value;
      return Reflect.get(real, key, view);
    }

    set(real: QueryRunner, key: PropertyKey, value: unknown): boolean {
      if (!this.#keeps(key)) return Reflect.set(real, key, value);
      this.#own.set(key, value);
      return true;
    }

    defineProperty(real: QueryRunner, key: PropertyKey, descriptor: PropertyDescriptor): boolean {
      if (!this.#keeps(key) || !("value" in descriptor)) return Reflect.defineProperty(real, key, descriptor);
      this.#own.set(key, descriptor.value);
      return true;
    }

    deleteProperty(real: QueryRunner, key: PropertyKey): boolean {
      if (this.#own.delete(key)) return true;
      return Reflect.deleteProperty(real, key);
    }

    getOwnPropertyDescriptor(real: QueryRunner, key: PropertyKey): PropertyDescriptor | undefined {
      if (!this.#own.has(key)) return Reflect.getOwnPropertyDescriptor(real, key);
      return { value: this.#own.get(key), writable: true, enumerable: true, configurable: true };
    }
  };

  /** The broadcaster of entity events for this session's runner view. */
  #broadcaster: unknown;

  #createRunner(): QueryRunner {
    const real = this.#host.dataSource.driver.createQueryRunner("master");
    const handler = new Session.#ViewHandler(this, real, this.#host.lease !== undefined);
    const runner = new Proxy(real, handler);
    this.#handler = handler;
    // Entity events (beforeInsert, afterLoad...) are broadcast through the runner: give them this
    // session's runner and manager, not whichever session used the shared SQLite runner last.
    const Broadcaster = real.broadcaster.constructor as new (runner: QueryRunner) => unknown;
    this.#broadcaster = new Broadcaster(runner);
    this.#real = real;
    this.#runner = runner;
    this.#manager = this.#host.manager(runner, this);
    // Subscribers of the driver's own events (BeforeQuery, AfterTransactionCommit...) see our manager.
    if (this.#host.lease === undefined) Object.assign(real, { manager: this.#manager });
    return real;
  }

  /**
   * TypeORM itself begins a transaction through the runner (`manager.transaction()`,
   * an implicit one around `save()`): it becomes a level, ended by the matching
   * commit/rollback through the runner. A begin that failed leaves nothing behind for
   * TypeORM's rollback to undo.
   */
  async #viewBegin(isolation: IsolationLevel | undefined): Promise<void> {
    const handle = (await this._enter(storage.getStore(), {
      isolation,
      readOnly: false,
      durable: false,
      savepoint: true,
      name: undefined,
    })) as Handle;
    this.#viewLevels.push(handle.level);
  }

  async #viewEnd(commit: boolean): Promise<void> {
    const frame = storage.getStore();
    this.#viewLevels = this.#viewLevels.filter((l) => l.ended === undefined);
    const level = this.#viewLevels.at(-1);
    if (level === undefined || !(level.owner === undefined || isWithin(frame, level.owner))) {
      throw new TransactionNotActiveError(String(this), commit ? "commitTransaction" : "rollbackTransaction");
    }
    this.#viewLevels.pop();
    const outcome = await this._exit({ level, joined: false } satisfies Handle, commit);
    await this._runCallbacks(outcome.callbacks);
    if ("error" in outcome) throw outcome.error;
  }

  /** Take the connection of a pooled driver (once). */
  #connect(): Promise<void> | undefined {
    if (this.#connected === true) return undefined;
    if (this.#host.lease !== undefined) {
      // The one shared connection is always open; taking the lease is what counts.
      this.#connected = true;
      this.#host.emit("connect", this);
      return undefined;
    }
    // Taken again while the last one is still being given back: after that.
    if (this.#releasing !== undefined) return this.#releasing.then(() => this.#connect());
    if (this.#connected === false) {
      const connecting = (async () => {
        await this.#real!.connect();
        this.#connected = true;
        this.#host.emit("connect", this);
      })();
      this.#connected = connecting;
      connecting.catch(() => {
        if (this.#connected === connecting) this.#connected = false;
      });
    }
    return this.#connected;
  }

  /**
   * On a single-connection driver, take (or re-enter) the connection lease:
   * `undefined` when granted at once. A session that would wait for a transaction
   * held by its own enclosing scope would wait forever: that is a
   * {@link PropagationError}.
   */
  #acquire(lease: Lease<Session>, shared = false): Promise<void> | undefined {
    const holder = lease.holder;
    if (holder !== undefined && holder !== this && holder._holdsTransactionOn(lease)) {
      for (const f of lineage(storage.getStore())) {
        if (f.scope.session === holder || holder._test) {
          throw new PropagationError(
            `${String(this)} needs the single connection of this ${this.#host.family} database, but the ` +
              `enclosing ${String(holder)} holds it in an open transaction, so it would wait forever. ` +
              `Use propagation "required", or start the work from afterCommit().`,
          );
        }
      }
    }
    // The first hold is the session's connect (synchronous).
    const waiting = lease.acquire(this, shared);
    if (waiting === undefined) {
      void this.#connect();
      return undefined;
    }
    return waiting.then(() => void this.#connect());
  }

  /** Pooled drivers: wait until work from `frame` may run, then keep the connection until the session closes. */
  async #gatePooled(frame: Frame | undefined): Promise<void> {
    this.#pinned = true;
    for (;;) {
      this.#assertUsable(frame);
      if (!this.#mayRun(frame)) await this.#turn(frame);
      else if (this.#connected !== true) await this.#connect();
      else return;
    }
  }

  /** Send a statement (a query, a BEGIN, a COMMIT...) when the connection is free: one at a time, in order. */
  #send<T>(send: () => Promise<T>): Promise<T> {
    return queueOf(this.#real!).run(send);
  }

  /**
   * Run one of the driver runner's transaction methods for the session's own BEGIN,
   * COMMIT, ROLLBACK or SAVEPOINT: through what the user assigned under that name on
   * the view, if anything (whose call of the original comes back here), on a view of
   * the runner whose statements take the connection's queue and pass through a `query`
   * the user assigned. So spies and APM wrappers on `s.queryRunner` see them.
   */
  async #transaction(method: TransactionMethod, args: unknown[] = []): Promise<void> {
    const assigned = this.#handler!.assigned(method);
    if (assigned === undefined) return this.#driverCall(method, args);
    this.#pending.add(method);
    try {
      await assigned.apply(this.#runner, args);
    } finally {
      this.#pending.delete(method);
    }
  }

  /** A statement of the session's own (SET TRANSACTION READ ONLY...), as {@link #transaction} sends them. */
  #sendOwn(sql: string): Promise<unknown> {
    return (this.#controlRunner().query as AnyQuery)(sql);
  }

  #driverCall(method: TransactionMethod, args: unknown[]): Promise<void> {
    const call = Reflect.get(this.#real!, method) as (...args: unknown[]) => Promise<void>;
    return call.apply(this.#controlRunner(), args);
  }

  #controlRunner(): QueryRunner {
    if (this.#controlView !== undefined) return this.#controlView;
    const query = (sql: string, parameters?: unknown[], structured?: boolean): Promise<unknown> => {
      // TypeORM's SQLite runners begin with a deferred BEGIN, which takes no lock: a transaction
      // that reads and then writes must upgrade, and SQLite answers SQLITE_BUSY at once, without
      // waiting for its busy timeout, when another connection wrote in between.
      if (this.#immediate && sql === "BEGIN TRANSACTION") {
        this.#immediate = false;
        sql = "BEGIN IMMEDIATE TRANSACTION";
      }
      const assigned = this.#handler!.assigned("query");
      if (assigned === undefined) return this.#controlStatement(sql, parameters, structured === true);
      this.#pending.add("query");
      return Promise.resolve(assigned.call(this.#runner, sql, parameters, structured)).finally(() =>
        this.#pending.delete("query"),
      );
    };
    this.#controlView = new Proxy(this.#real!, {
      get: (real, key, view) => (key === "query" ? query : Reflect.get(real, key, view)),
    });
    return this.#controlView;
  }

  /** One of the session's own transaction statements: it has the connection, and waits only for the statements before it. */
  #controlStatement(sql: string, parameters: unknown[] | undefined, structured: boolean): Promise<unknown> {
    const real = this.#real!;
    return this.#send(() => runQuery(real, real, sql, parameters, structured));
  }

  /**
   * Pooled drivers: outside a transaction the connection goes back to the pool as soon
   * as no statement of the session needs it (SQLAlchemy's Session holds one only for a
   * transaction), so that code mixing the session with `dataSource.manager` in one
   * request cannot exhaust the pool. Kept with `holdConnection`, and for drivers whose
   * runners cannot take a connection again after `release()`.
   */
  #releaseIfUnused(): void {
    if (
      this.#pinned ||
      this.#uses > 0 ||
      this.#levels.length > 0 ||
      this.#connected !== true ||
      this.#state !== OPEN ||
      this.#host.lease !== undefined
    ) {
      return;
    }
    const real = this.#real!;
    if (!canReconnect(real)) {
      this.#pinned = true;
      return;
    }
    this.#connected = false;
    this.#releasing = (async () => {
      try {
        await real.release();
      } catch (error) {
        this.#host.reportError(this, error);
      }
      reconnectable(real);
      this.#releasing = undefined;
    })();
  }

  async #statement(sql: string, parameters: unknown[] | undefined, structured: boolean): Promise<unknown> {
    const frame = storage.getStore();
    const reopening = this.#reopening();
    if (reopening !== undefined) await reopening;
    if (this.#real === undefined) this.#createRunner();
    const real = this.#real!;
    const lease = this.#host.lease;
    this.#statements += 1;
    if (lease === undefined) {
      for (;;) {
        this.#assertUsable(frame);
        if (this.#mayRun(frame)) break;
        await this.#turn(frame);
      }
      // The connection is held from here until the last queued statement is answered
      // (or, inside a transaction, until its COMMIT or ROLLBACK).
      this.#uses += 1;
      const running = this.#send(async () => {
        this.#assertUsable(frame);
        const connecting = this.#connect();
        if (connecting !== undefined) await connecting;
        return runQuery(real, real, sql, parameters, structured);
      });
      this.#inFlight.add(running);
      try {
        return await running;
      } finally {
        this.#inFlight.delete(running);
        this.#uses -= 1;
        this.#releaseIfUnused();
        if (this.#requestOver !== undefined) this.#closeIfIdle();
      }
    }
    // Each pass waits for something (a turn, the lease) and checks again: whatever
    // changed meanwhile, the statement runs only when it may. Outside a transaction it
    // shares the lease with other such statements, which pipeline on the connection.
    for (;;) {
      this.#assertUsable(frame);
      if (!this.#mayRun(frame)) {
        await this.#turn(frame);
        continue;
      }
      const shared = this.#levels.length === 0;
      const waiting = this.#acquire(lease, shared);
      if (waiting !== undefined) await waiting;
      if (this._usableFrom(frame) && this.#mayRun(frame) && (!shared || this.#levels.length === 0)) break;
      lease.release(this);
    }
    // The shared runner's query runs on this session's view, so that the events it
    // broadcasts (BeforeQuery, AfterQuery) carry this session's runner and manager even
    // while other sessions' statements run alongside.
    const running = this.#send(() => {
      // Queued behind other sessions' statements: refused if this session was closed meanwhile.
      this.#assertUsable(frame);
      return runQuery(real, this.#runner!, sql, parameters, structured);
    });
    this.#inFlight.add(running);
    try {
      return await running;
    } finally {
      this.#inFlight.delete(running);
      lease.release(this);
      if (this.#requestOver !== undefined) this.#closeIfIdle();
    }
  }

  /** Push a level (synchronously, so that nobody slips in between) or decide to join. */
  #push(frame: Frame | undefined, spec: LevelSpec): Handle {
    const top = this.#levels.at(-1);
    // Under useTransactionalTests() a block that would be outermost behaves so: durable is
    // allowed, isolation and readOnly are ignored, and its transaction is a savepoint.
    if (top !== undefined && !top.invisible) {
      const who = spec.name === undefined ? "A nested transactional block" : `Block "${spec.name}"`;
      if (spec.durable) {
        throw new PropagationError(
          `${who} is durable but runs inside an open transaction of ${String(this)}. ` +
            `Call it outside any transaction, or use propagation "requiresNew".`,
        );
      }
      if (spec.isolation !== undefined) {
        throw new PropagationError(
          `${who} asks for isolation ${spec.isolation} but joins an open transaction of ${String(this)}, ` +
            `whose isolation is already set. Set isolation on the outermost block, or use propagation "requiresNew".`,
        );
      }
      if (spec.readOnly && !top.readOnly) {
        throw new PropagationError(
          `${who} asks for readOnly but joins a read-write transaction of ${String(this)}. ` +
            `Set readOnly on the outermost block, or use propagation "requiresNew".`,
        );
      }
      if (!spec.savepoint) return { level: top, joined: true };
    }
    const level: Level = {
      owner: frame,
      savepoint: top !== undefined,
      readOnly: top?.invisible === true ? false : (top?.readOnly ?? spec.readOnly),
      startedAt: performance.now(),
      begun: false,
      forced: false,
      ending: undefined,
      attempt: spec.attempt,
      invisible: spec.invisible === true,
      runAfterCommit: spec.runAfterCommit !== false,
      afterCommit: undefined,
      afterRollback: undefined,
      beforeCommit: undefined,
      rollbackOnly: undefined,
      ended: undefined,
    };
    this.#levels.push(level);
    return { level, joined: false };
  }

  /** Send the BEGIN (taking the connection first) or the SAVEPOINT of a pushed level. */
  async #start(handle: Handle, spec: LevelSpec): Promise<Handle> {
    if (handle.joined) return handle;
    const level = handle.level;
    const real = this.#real ?? this.#createRunner();
    const lease = this.#host.lease;
    let held = false;
    try {
      if (!level.savepoint) {
        if (lease === undefined) {
          await this.#connect();
        } else {
          const waiting = this.#acquire(lease);
          held = true;
          if (waiting !== undefined) {
            held = false;
            await waiting;
            held = true;
          }
          // The shared runner's own transaction events (BeforeTransactionStart...) carry the
          // manager of the session that holds it alone until its COMMIT or ROLLBACK.
          Object.assign(real, { manager: this.#manager });
        }
      }
      // One BEGIN or SAVEPOINT at a time: a savepoint needs its transaction begun.
      while (this.#starting !== undefined) await this.#starting;
      // Closing or closed while waiting: nothing was begun, and nothing may be now.
      if (level.ended !== undefined || !this._usableFrom(storage.getStore())) throw this.#closedError();
      const below = this.#levels[this.#levels.indexOf(level) - 1];
      if (level.savepoint && below?.begun !== true) {
        throw new PropagationError(`${String(this)}: the transaction this savepoint belongs to failed to begin.`);
      }
      const starting = (async () => {
        if (level.savepoint) {
          await this.#transaction("startTransaction");
        } else {
          try {
            // MySQL sets the access mode of the next transaction, before it begins.
            if (spec.readOnly && this.#host.family === "mysql") {
              await this.#sendOwn("SET TRANSACTION READ ONLY");
            }
            // SQLite: a transaction that may write takes the write lock as it begins, so that
            // another process's writer makes it wait (busy timeout) rather than fail later. Not
            // the test's own transaction of useTransactionalTests(), which writes nothing itself.
            this.#immediate = !spec.readOnly && spec.invisible !== true && this.#host.family === "sqlite";
            try {
              await this.#transaction("startTransaction", [spec.isolation]);
            } finally {
              this.#immediate = false;
            }
            if (spec.readOnly) await this.#readOnly(true);
          } catch (error) {
            await this.#undoBegin(real, spec.readOnly && this.#host.family === "mysql");
            throw error;
          }
        }
        level.begun = true;
      })();
      const settled = starting.catch(() => undefined);
      this.#starting = settled;
      try {
        await starting;
      } finally {
        if (this.#starting === settled) this.#starting = undefined;
      }
    } catch (error) {
      if (level.ended === undefined) this.#pop(level, "rolledBack");
      if (held) lease!.release(this);
      this.#wake();
      throw error;
    }
    this.#host.emit("begin", this, { savepoint: level.savepoint, attempt: level.attempt });
    return handle;
  }

  /**
   * A BEGIN (or what followed it) failed: leave the connection as we found it. On
   * MySQL a `SET TRANSACTION READ ONLY` that went through would make the connection's
   * next transaction read-only: `accessModeSet` resets it (or the connection is discarded).
   */
  async #undoBegin(real: QueryRunner, accessModeSet = false): Promise<void> {
    if (accessModeSet && !real.isTransactionActive) {
      try {
        await this.#sendOwn("SET TRANSACTION READ WRITE");
      } catch (error) {
        await this.#discard(error);
        return;
      }
    }
    if (real.isTransactionActive) {
      try {
        await this.#transaction("rollbackTransaction");
      } catch (error) {
        // SQLite: the BEGIN itself failed (BEGIN IMMEDIATE answers SQLITE_BUSY once the busy
        // timeout has run out), so no transaction is open: the state we want.
        if (!(this.#host.family === "sqlite" && /no transaction is active/.test(String(error)))) {
          this.#host.reportError(this, error);
          await this.#discard(error);
          return;
        }
      }
    }
    Object.assign(real, { isTransactionActive: false, transactionDepth: 0 });
  }

  async #readOnly(on: boolean): Promise<void> {
    const family = this.#host.family;
    if (family === "postgres" && on) await this.#sendOwn("SET TRANSACTION READ ONLY");
    if (family === "sqlite") await this.#sendOwn(`PRAGMA query_only = ${on ? "ON" : "OFF"}`);
  }

  #pop(level: Level, ended: "committed" | "rolledBack"): void {
    const index = this.#levels.indexOf(level);
    if (index !== -1) this.#levels.splice(index, 1);
    level.ended = ended;
  }

  /**
   * End a level once: whoever comes second (the session closing while its block
   * commits, say) waits for the first and gets nothing to do.
   */
  #end(level: Level, commit: boolean): Promise<LevelOutcome> {
    if (level.ending !== undefined) return level.ending.then(() => ({ callbacks: [] }));
    // Statements already let through reach the connection before the COMMIT or
    // ROLLBACK, so that none runs after it, outside the transaction it belonged to.
    const end = (): Promise<LevelOutcome> => (commit ? this.#commitLevel(level) : this.#rollbackLevel(level));
    level.ending = this.#inFlight.size === 0 ? end() : this.#answered().then(end);
    return level.ending;
  }

  /** Wait until every statement in flight has been answered. */
  async #answered(): Promise<void> {
    while (this.#inFlight.size > 0) await Promise.allSettled(this.#inFlight);
  }

  async #commitLevel(level: Level): Promise<LevelOutcome> {
    if (level.rollbackOnly !== undefined) {
      const rolledBack = await this.#rollbackLevel(level);
      return {
        callbacks: rolledBack.callbacks,
        error: new PropagationError(
          `${String(this)} was rolled back instead of committed: the inner block "${level.rollbackOnly}" ` +
            `failed after joining this transaction with savepoint: false, and its error was caught. ` +
            `Let the error propagate, or give the inner block a savepoint (the default) to undo only its own work.`,
        ),
      };
    }
    try {
      await this.#transaction("commitTransaction");
    } catch (error) {
      if (level.savepoint) {
        const rolledBack = await this.#rollbackLevel(level);
        return { callbacks: rolledBack.callbacks, error };
      }
      // A failed COMMIT leaves the connection in an unknown state: never reuse it.
      this.#pop(level, "rolledBack");
      await this.#discard(error);
      this.#host.emit("rollback", this, {
        error,
        durationMs: performance.now() - level.startedAt,
        attempt: level.attempt,
      });
      this.#wake();
      return { callbacks: level.afterRollback ?? [], error };
    }
    this.#pop(level, "committed");
    const parent = this.#levels.at(-1);
    if (parent?.invisible === true) {
      // Outermost to the code under test: its callbacks run now (or are dropped on request).
      this.#host.emit("commit", this, { savepoint: true, durationMs: performance.now() - level.startedAt });
      this.#wake();
      return { callbacks: parent.runAfterCommit ? (level.afterCommit ?? []) : [] };
    }
    if (level.savepoint && parent !== undefined) {
      if (level.afterCommit) (parent.afterCommit ??= []).push(...level.afterCommit);
      if (level.afterRollback) (parent.afterRollback ??= []).push(...level.afterRollback);
      if (level.beforeCommit) (parent.beforeCommit ??= []).push(...level.beforeCommit);
    } else {
      await this.#endOutermost(level);
    }
    this.#host.emit("commit", this, {
      savepoint: level.savepoint,
      durationMs: performance.now() - level.startedAt,
      attempt: level.attempt,
    });
    this.#wake();
    return { callbacks: level.savepoint ? [] : (level.afterCommit ?? []) };
  }

  async #rollbackLevel(level: Level): Promise<LevelOutcome> {
    let failed = false;
    try {
      await this.#transaction("rollbackTransaction");
    } catch (error) {
      failed = true;
      this.#host.reportError(this, error);
      // Whether a ROLLBACK (TO SAVEPOINT) that failed undid anything is unknown,
      // and TypeORM's idea of the nesting no longer matches: never reuse it.
      this.#pop(level, "rolledBack");
      await this.#discard(error);
    }
    if (!failed) {
      this.#pop(level, "rolledBack");
      if (!level.savepoint) await this.#endOutermost(level);
    }
    this.#host.emit("rollback", this, {
      savepoint: level.savepoint,
      durationMs: performance.now() - level.startedAt,
      attempt: level.attempt,
    });
    this.#wake();
    return { callbacks: level.afterRollback ?? [] };
  }

  /** After the outermost COMMIT or ROLLBACK: undo per-transaction settings, give the lease back. */
  async #endOutermost(level: Level): Promise<void> {
    if (level.readOnly && this.#host.family === "sqlite") {
      try {
        await this.#readOnly(false);
      } catch (error) {
        this.#host.reportError(this, error);
      }
    }
    this.#host.lease?.release(this);
    this.#releaseIfUnused();
  }

  /**
   * Ask PostgreSQL to stop the statement this session's backend is running, from a
   * connection of its own (the pool may be exhausted), so that the ROLLBACK that follows
   * does not wait for it and the server does not keep working for nobody.
   */
  async #cancelStatement(): Promise<void> {
    try {
      await cancelStatement(this.#host.dataSource, this.#real!);
    } catch (error) {
      this.#host.reportError(this, error);
    }
  }

  /**
   * The connection failed a COMMIT or ROLLBACK. A pooled one is destroyed; the one
   * shared connection of SQLite cannot be, so it is rolled back as far as it goes
   * and TypeORM's view of it reset. Either way this session is finished.
   */
  async #discard(error: unknown): Promise<void> {
    if (this.#broken !== undefined) return;
    this.#broken = error ?? new Error("connection discarded");
    const lease = this.#host.lease;
    // The shared connection is ours to clean up only while we hold it.
    if (lease === undefined || lease.holder === this) await discardConnection(this.#real!, lease !== undefined, error);
    this.#host.lease?.releaseAll(this);
    for (const level of this.#levels.splice(0)) {
      level.ended = "rolledBack";
      level.forced = true;
    }
    this.#abort?.abort(this.#closedError());
    this.#wake();
  }
}

/** The part of node-postgres' Client used to cancel a statement. */
type AnyQuery = (sql: string, parameters?: unknown[], structured?: boolean) => Promise<unknown>;

type TransactionMethod = "startTransaction" | "commitTransaction" | "rollbackTransaction";

/**
 * Run the driver's `query` of `real` on `self` (the runner, or a view of it).
 * `QueryRunner.query` has one overload per result shape; the session passes the
 * caller's choice through.
 */
function runQuery(
  real: QueryRunner,
  self: QueryRunner,
  sql: string,
  parameters: unknown[] | undefined,
  structured: boolean,
): Promise<unknown> {
  return (real.query as AnyQuery).call(self, sql, parameters, structured);
}

function assertCallback(callback: unknown, method: string): void {
  if (typeof callback !== "function") {
    throw new TypeError(
      `Expected the ${method}() callback to be a function, got \`${String(callback)}\` (${typeof callback})`,
    );
  }
}
