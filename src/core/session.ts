import type { DataSource, EntityManager, EntityTarget, ObjectLiteral, QueryRunner, Repository } from "typeorm";
import { PropagationError, SessionClosedError, TransactionNotActiveError } from "../errors.js";
import type { Lease } from "./lease.js";
import type { IsolationLevel } from "./options.js";
import type { SessionRegistry } from "./registry.js";
import { type Frame, isWithin, storage } from "./scope.js";
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
  /** Name of an inner block that failed inside this level with `savepoint: false`. */
  rollbackOnly: string | undefined;
  ended: "committed" | "rolledBack" | undefined;
}

/** @internal A handle returned to blocks: the level they opened, or `undefined` when they joined. */
export type LevelHandle = object | undefined;

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
}

const OPEN = 0;
const CLOSING = 1;
const CLOSED = 2;

const JOINED = Symbol("joined");

let lastId = 0;

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
  /** The block's label (its `name` option or method name), if any. */
  readonly name: string | undefined;
  /** The registry that created this session. */
  readonly registry: SessionRegistry;

  readonly #host: SessionHost;
  readonly #openedAt = performance.now();
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
  #waiters: { frame: Frame | undefined; grant: () => void }[] = [];

  /** @internal Sessions are created by registries. */
  constructor(registry: SessionRegistry, host: SessionHost, name: string | undefined) {
    this.id = ++lastId;
    this.name = name;
    this.registry = registry;
    this.#host = host;
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
    return this.#statement(sql, parameters, false) as Promise<T>;
  }

  /** Whether a transaction is open on this session. */
  get inTransaction(): boolean {
    return this.#levels.length > 0;
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
    const outcome = await this._exit(top, true);
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
    const outcome = await this._exit(top, false);
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
    this.#assertUsable(storage.getStore());
    const top = this.#levels.at(-1);
    if (top === undefined) {
      void this._runCallbacks([callback]);
      return;
    }
    (top.afterCommit ??= []).push(callback);
  }

  /**
   * Run `callback` after the transaction (or the savepoint) it was registered in
   * rolls back, before the block settles. Outside a transaction it is never called.
   */
  afterRollback(callback: SessionCallback): void {
    assertCallback(callback, "afterRollback");
    this.#assertUsable(storage.getStore());
    const top = this.#levels.at(-1);
    if (top !== undefined) (top.afterRollback ??= []).push(callback);
  }

  // ---------------------------------------------------------------------------
  // Used by blocks and the registry. Not part of the public API.

  /** @internal Whether work from `frame` is still accepted (open, or the closing block itself). */
  _usableFrom(frame: Frame | undefined): boolean {
    if (this.#broken !== undefined) return false;
    if (this.#state === OPEN) return true;
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

  /**
   * @internal Open a transaction level for a block running in `frame`: a
   * transaction, a savepoint, or `undefined` when the block joins the enclosing
   * one (`savepoint: false`). Waits while another block of this session owns
   * the open transaction.
   */
  _enter(frame: Frame | undefined, spec: LevelSpec): Promise<LevelHandle> {
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
            resolve(this.#start(this.#push(frame, spec), spec));
          } catch (error) {
            reject(error);
          }
        },
      });
    });
  }

  /**
   * @internal End a level opened by {@link _enter}: commit (or release the
   * savepoint) or roll back. Never rejects: failures come back as `error`.
   */
  async _exit(handle: LevelHandle, commit: boolean): Promise<LevelOutcome> {
    const level = handle as Level;
    if (level.ended !== undefined) {
      if (commit && level.ended === "rolledBack" && this.closed) {
        return { callbacks: [], error: this.#closedError("its transaction was rolled back when it closed") };
      }
      return { callbacks: [] };
    }
    return this.#asCloser(async () => {
      // Levels opened above this one and left open (a begin() without commit) are undone.
      const callbacks: SessionCallback[] = [];
      while (this.#levels.length > 0 && this.#levels.at(-1) !== level) {
        callbacks.push(...(await this.#rollbackLevel(this.#levels.at(-1)!)).callbacks);
      }
      const outcome = commit ? await this.#commitLevel(level) : await this.#rollbackLevel(level);
      return callbacks.length === 0 ? outcome : { ...outcome, callbacks: [...callbacks, ...outcome.callbacks] };
    });
  }

  /** @internal An inner block that joined with `savepoint: false` failed. */
  _markRollbackOnly(name: string | undefined): void {
    const top = this.#levels.at(-1);
    if (top !== undefined) top.rollbackOnly ??= name ?? "an anonymous block";
  }

  /**
   * @internal The block that owns the session starts its final COMMIT or ROLLBACK:
   * from now on only that block's own cleanup may use the session.
   */
  _markClosing(): void {
    if (this.#state !== OPEN) return;
    this.#state = CLOSING;
    const frame = storage.getStore();
    this.#closer = frame === undefined ? undefined : { scope: frame.scope, parent: frame };
    this.#wake();
  }

  /**
   * @internal Close the session: roll back what is open, release the connection,
   * abort the signal. Idempotent. Resolves to the `afterRollback` callbacks of what
   * was rolled back.
   */
  _close(): Promise<SessionCallback[]> {
    this.#closing ??= this.#closeOnce();
    return this.#closing;
  }

  /** @internal Run callbacks in order, reporting failures through `error`. */
  async _runCallbacks(callbacks: readonly SessionCallback[]): Promise<void> {
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
    await this.#asCloser(async () => {
      while (this.#levels.length > 0 && this.#broken === undefined) {
        callbacks.push(...(await this.#rollbackLevel(this.#levels.at(-1)!)).callbacks);
      }
      if (this.#real !== undefined && this.#broken === undefined && this.#host.lease === undefined) {
        try {
          await this.#real.release();
        } catch (error) {
          this.#host.reportError(this, error);
        }
      }
    });
    this.#host.lease?.releaseAll(this);
    this.#state = CLOSED;
    this.#abort?.abort(this.#closedError());
    this.#wake();
    this.#host.closed(this, performance.now() - this.#openedAt);
    return callbacks;
  }

  #asCloser<T>(fn: () => Promise<T>): Promise<T> {
    return this.#state === CLOSING && this.#closer !== undefined ? storage.run(this.#closer, fn) : fn();
  }

  #closedError(detail?: string): SessionClosedError {
    if (detail === undefined && this.#broken !== undefined) {
      detail = "its connection was discarded after a failed COMMIT or ROLLBACK";
    }
    return new SessionClosedError(String(this), detail);
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

  #assertUsable(frame: Frame | undefined): void {
    if (!this._usableFrom(frame)) throw this.#closedError();
  }

  /** Work from `frame` may run unless a transaction level owned by another block is open. */
  #mayRun(frame: Frame | undefined): boolean {
    const top = this.#levels.at(-1);
    return top === undefined || top.owner === undefined || isWithin(frame, top.owner);
  }

  /** Wake waiters that may run now, in order; a granted level changes who may run next. */
  #wake(): void {
    if (this.#waiters.length === 0) return;
    const waiting = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiting) {
      if (this.#state !== OPEN || this.#mayRun(waiter.frame)) waiter.grant();
      else this.#waiters.push(waiter);
    }
  }

  #createRunner(): void {
    const real = this.#host.dataSource.driver.createQueryRunner("master");
    // A view of the driver's runner whose entry points go through this session, so
    // that everything TypeORM does with it is gated, counted and scoped. Reads fall
    // through to the driver's runner; nothing of TypeORM is patched.
    const runner = Object.create(real, {
      query: {
        value: (sql: string, parameters?: unknown[], structured?: boolean) =>
          this.#statement(sql, parameters, structured === true),
      },
      connect: {
        value: async () => {
          this.#assertUsable(storage.getStore());
          await this.#connect();
          return real.connect();
        },
      },
      release: { value: () => Promise.resolve() },
      startTransaction: { value: (isolation?: IsolationLevel) => this.begin(isolation) },
      commitTransaction: { value: () => this.commit() },
      rollbackTransaction: { value: () => this.rollback() },
      isTransactionActive: {
        get: () => this.#levels.length > 0 && this.#mayRun(storage.getStore()),
      },
      isReleased: { get: () => false },
    }) as QueryRunner;
    this.#real = real;
    this.#runner = runner;
    this.#manager = this.#host.dataSource.createEntityManager(runner);
    // Subscribers of the driver's own events (BeforeQuery, AfterTransactionCommit...) see our manager.
    if (this.#host.lease === undefined) Object.assign(real, { manager: this.#manager });
  }

  /** Take the connection: the lease on single-connection drivers, the pool otherwise. */
  #connect(): Promise<void> | undefined {
    if (this.#connected === true) return undefined;
    if (this.#connected === false) {
      this.#connected = (async () => {
        if (this.#host.lease === undefined) await this.#real!.connect();
        this.#connected = true;
        this.#host.emit("connect", this);
      })();
      this.#connected.catch(() => {
        this.#connected = false;
      });
    }
    return this.#connected;
  }

  /**
   * On a single-connection driver, take (or re-enter) the connection lease. A
   * session that would wait for a transaction held by its own enclosing scope
   * would wait forever: that is a {@link PropagationError}.
   */
  async #hold(): Promise<void> {
    const lease = this.#host.lease!;
    const holder = lease.holder;
    if (holder !== undefined && holder !== this && holder.inTransaction) {
      for (let f = storage.getStore(); f !== undefined; f = f.parent) {
        if (f.scope.session === holder) {
          throw new PropagationError(
            `${String(this)} needs the single connection of this ${this.#host.family} database, but the ` +
              `enclosing ${String(holder)} holds it in an open transaction, so it would wait forever. ` +
              `Use propagation "required", or start the work from afterCommit().`,
          );
        }
      }
    }
    const waiting = lease.acquire(this);
    if (waiting !== undefined) await waiting;
    Object.assign(this.#real!, { manager: this.#manager });
    await this.#connect();
  }

  async #statement(sql: string, parameters: unknown[] | undefined, structured: boolean): Promise<unknown> {
    const frame = storage.getStore();
    this.#assertUsable(frame);
    while (!this.#mayRun(frame)) {
      await new Promise<void>((grant) => this.#waiters.push({ frame, grant }));
      this.#assertUsable(frame);
    }
    if (this.#real === undefined) this.#createRunner();
    const lease = this.#host.lease;
    if (lease === undefined) {
      if (this.#connected !== true) await this.#connect();
      this.#assertUsable(frame);
      return runQuery(this.#real!, sql, parameters, structured);
    }
    await this.#hold();
    try {
      this.#assertUsable(frame);
      return await runQuery(this.#real!, sql, parameters, structured);
    } finally {
      lease.release(this);
    }
  }

  /** Push a level (synchronously, so that nobody slips in between) or decide to join. */
  #push(frame: Frame | undefined, spec: LevelSpec): Level | typeof JOINED {
    this.#assertUsable(frame);
    const top = this.#levels.at(-1);
    if (top !== undefined) {
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
      if (!spec.savepoint) return JOINED;
    }
    const level: Level = {
      owner: frame,
      savepoint: top !== undefined,
      readOnly: top?.readOnly ?? spec.readOnly,
      startedAt: performance.now(),
      afterCommit: undefined,
      afterRollback: undefined,
      rollbackOnly: undefined,
      ended: undefined,
    };
    this.#levels.push(level);
    return level;
  }

  async #start(level: Level | typeof JOINED, spec: LevelSpec): Promise<LevelHandle> {
    if (level === JOINED) return undefined;
    if (this.#real === undefined) this.#createRunner();
    const real = this.#real!;
    try {
      if (level.savepoint) {
        await real.startTransaction();
      } else {
        if (this.#host.lease === undefined) await this.#connect();
        else await this.#hold();
        try {
          await real.startTransaction(spec.isolation);
          if (spec.readOnly) await this.#readOnly(real, true);
        } catch (error) {
          await this.#undoBegin(real);
          throw error;
        }
      }
    } catch (error) {
      this.#levels.splice(this.#levels.indexOf(level), 1);
      this.#wake();
      throw error;
    }
    this.#host.emit("begin", this, { savepoint: level.savepoint });
    return level;
  }

  /** A BEGIN (or what followed it) failed: leave the connection as we found it. */
  async #undoBegin(real: QueryRunner): Promise<void> {
    if (real.isTransactionActive) {
      try {
        await real.rollbackTransaction();
      } catch (error) {
        this.#host.reportError(this, error);
        await this.#discard(error);
        return;
      }
    }
    Object.assign(real, { isTransactionActive: false, transactionDepth: 0 });
    this.#host.lease?.release(this);
  }

  async #readOnly(real: QueryRunner, on: boolean): Promise<void> {
    const family = this.#host.family;
    if (family === "postgres" && on) await real.query("SET TRANSACTION READ ONLY");
    if (family === "sqlite") await real.query(`PRAGMA query_only = ${on ? "ON" : "OFF"}`);
  }

  #pop(level: Level, ended: "committed" | "rolledBack"): void {
    const index = this.#levels.indexOf(level);
    if (index !== -1) this.#levels.splice(index, 1);
    level.ended = ended;
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
    const real = this.#real!;
    try {
      await real.commitTransaction();
    } catch (error) {
      if (level.savepoint) {
        const rolledBack = await this.#rollbackLevel(level);
        return { callbacks: rolledBack.callbacks, error };
      }
      // A failed COMMIT leaves the connection in an unknown state: never reuse it.
      await this.#discard(error);
      this.#pop(level, "rolledBack");
      this.#host.emit("rollback", this, { error, durationMs: performance.now() - level.startedAt });
      this.#wake();
      return { callbacks: level.afterRollback ?? [], error };
    }
    this.#pop(level, "committed");
    const parent = this.#levels.at(-1);
    if (level.savepoint && parent !== undefined) {
      if (level.afterCommit) (parent.afterCommit ??= []).push(...level.afterCommit);
      if (level.afterRollback) (parent.afterRollback ??= []).push(...level.afterRollback);
    } else {
      await this.#endOutermost(real, level);
    }
    this.#host.emit("commit", this, { savepoint: level.savepoint, durationMs: performance.now() - level.startedAt });
    this.#wake();
    return { callbacks: level.savepoint ? [] : (level.afterCommit ?? []) };
  }

  async #rollbackLevel(level: Level): Promise<LevelOutcome> {
    const real = this.#real!;
    let failed: unknown;
    try {
      await real.rollbackTransaction();
    } catch (error) {
      failed = error ?? new Error("ROLLBACK failed");
      this.#host.reportError(this, error);
    }
    this.#pop(level, "rolledBack");
    if (level.savepoint) {
      if (failed !== undefined) this._markRollbackOnly("a savepoint whose ROLLBACK failed");
    } else if (failed !== undefined) {
      await this.#discard(failed);
    } else {
      await this.#endOutermost(real, level);
    }
    this.#host.emit("rollback", this, { savepoint: level.savepoint, durationMs: performance.now() - level.startedAt });
    this.#wake();
    return { callbacks: level.afterRollback ?? [] };
  }

  /** After the outermost COMMIT or ROLLBACK: undo per-transaction settings, give the lease back. */
  async #endOutermost(real: QueryRunner, level: Level): Promise<void> {
    if (level.readOnly && this.#host.family === "sqlite") {
      try {
        await this.#readOnly(real, false);
      } catch (error) {
        this.#host.reportError(this, error);
      }
    }
    this.#host.lease?.release(this);
  }

  /**
   * The connection failed a COMMIT or ROLLBACK. A pooled one is destroyed; the one
   * shared connection of SQLite cannot be, so it is rolled back as far as it goes
   * and TypeORM's view of it reset. Either way this session is finished.
   */
  async #discard(error: unknown): Promise<void> {
    if (this.#broken !== undefined) return;
    this.#broken = error ?? new Error("connection discarded");
    const real = this.#real!;
    await discardConnection(real, this.#host.lease !== undefined, error);
    this.#host.lease?.releaseAll(this);
    for (const level of this.#levels.splice(0)) level.ended = "rolledBack";
    this.#abort?.abort(this.#closedError());
  }
}

type AnyQuery = (sql: string, parameters?: unknown[], structured?: boolean) => Promise<unknown>;

/** `QueryRunner.query` has one overload per result shape; the session passes the caller's choice through. */
function runQuery(
  real: QueryRunner,
  sql: string,
  parameters: unknown[] | undefined,
  structured: boolean,
): Promise<unknown> {
  return (real.query as AnyQuery).call(real, sql, parameters, structured);
}

function assertCallback(callback: unknown, method: string): void {
  if (typeof callback !== "function") {
    throw new TypeError(
      `Expected the ${method}() callback to be a function, got \`${String(callback)}\` (${typeof callback})`,
    );
  }
}
