import type { DataSource, EntityManager, EntityTarget, ObjectLiteral, QueryRunner, Repository } from "typeorm";
import { PropagationError, type SessionClosedError, TransactionNotActiveError } from "../../errors.js";
import { SessionClosing } from "./closing.js";
import type { DriverFamily } from "../driver/driver.js";
import { ConnectionGate } from "./gate.js";
import type { Lease } from "../driver/lease.js";
import {
  type Handle,
  type LevelHandle,
  type LevelOutcome,
  type LevelSpec,
  LevelStack,
  type SessionCallback,
} from "./levels.js";
import type { IsolationLevel } from "../block/options.js";
import type { SessionRegistry } from "../registry/registry.js";
import { type Frame, type RequestEnd, scopeOf, storage } from "../scope.js";
import { SessionState } from "./state.js";
import type { SessionTrace } from "../tracing/session-trace.js";
import { Transactions } from "./transactions.js";
import { ViewCalls } from "./view-calls.js";

export type { SessionCallback } from "./levels.js";
export { OWNER } from "./runner-view.js";

/** @internal The registry's side of a session: shared resources, events and counters. */
export interface SessionHost {
  readonly dataSource: DataSource;
  readonly family: DriverFamily;
  /** The connection lease of single-connection drivers (SQLite), shared per DataSource. */
  readonly lease: Lease<Session> | undefined;
  /** With `replicas` and TypeORM's `replication`: read-only blocks may run on replicas. */
  readonly replicated: boolean;
  emit(event: "connect" | "begin" | "commit" | "rollback" | "close", session: Session, extra?: object): void;
  reportError(session: Session, error: unknown): void;
  closed(session: Session, durationMs: number): void;
  /** A closed request session is used again: count it as open; false while the registry drains. */
  reopened(session: Session): boolean;
  /** The EntityManager bound to a session's runner view (made once per runner). */
  manager(runner: QueryRunner, session: Session): EntityManager;
}

let lastId = 0;

/** The parts of a session that do I/O. */
interface Parts {
  readonly gate: ConnectionGate;
  readonly tx: Transactions;
  readonly closing: SessionClosing;
}

/**
 * @internal On a callback: what to call instead when the callback is dropped without
 * running (the `afterRollback` callbacks of a failed attempt that `retry` re-runs).
 */
export const DROPPED = Symbol("typeorm-scoped-session.dropped");

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
  /** @internal Statements the registry has counted already (a request session may close, reopen and close again). */
  _counted = 0;
  /** The block's label (its `name` option or method name), if any. */
  readonly name: string | undefined;
  /** The registry that created this session. */
  readonly registry: SessionRegistry;
  /**
   * Whether the session runs on a replica (a `readOnly` block with the registry's
   * `replicas` option); `false` on the primary.
   */
  readonly replica: boolean;
  /** @internal With `tracing` and a registered SDK: the session's spans, while it is open. */
  _trace: SessionTrace | undefined = undefined;

  readonly #host: SessionHost;
  readonly #state: SessionState;
  readonly #stack: LevelStack;
  /** The parts that do I/O, made on first use: a block that never touches the database needs none. */
  #parts: Parts | undefined;
  /** Set on a session from `open()`, which its caller closes: stops its timeout. */
  #callerOwned: (() => void) | undefined;

  /** Sessions are created by registries, never directly. */
  private constructor(registry: SessionRegistry, host: SessionHost, name: string | undefined, replica: boolean) {
    this.id = ++lastId;
    this.name = name;
    this.registry = registry;
    this.replica = replica;
    this.#host = host;
    this.#stack = new LevelStack();
    this.#state = new SessionState(this, host, this.#stack);
  }

  /** The session's connection gate, transactions and closing (made once). */
  #use(): Parts {
    if (this.#parts !== undefined) return this.#parts;
    const host = this.#host;
    const state = this.#state;
    const stack = this.#stack;
    const gate = new ConnectionGate(this, host, state, stack);
    const tx = new Transactions(this, host, state, stack, gate);
    const parts = { state, stack, gate, tx };
    gate.viewTarget = new ViewCalls(this, host, parts);
    return (this.#parts = { gate, tx, closing: new SessionClosing(this, host, parts) });
  }

  /** @internal */
  static _create(registry: SessionRegistry, host: SessionHost, name: string | undefined, replica = false): Session {
    return new Session(registry, host, name, replica);
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
    const { gate } = this.#use();
    if (gate.manager === undefined) gate.open();
    return gate.manager!;
  }

  /**
   * The session's `QueryRunner`, as an escape hatch for TypeORM APIs that take
   * one. Its transaction methods map to {@link begin}/{@link commit}/{@link rollback};
   * its `release()` does nothing, because the session's block releases it.
   */
  get queryRunner(): QueryRunner {
    const { gate } = this.#use();
    if (gate.view === undefined) gate.open();
    return gate.view!.runner;
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
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- the public API: like TypeORM's own query(), untyped unless the caller says
  query<T = any>(sql: string, parameters?: unknown[]): Promise<T> {
    // A `query` assigned on `s.queryRunner` (a spy, an APM wrapper) sees these too.
    const { gate } = this.#use();
    const assigned = gate.view?.assigned("query");
    if (assigned !== undefined) return Promise.resolve(assigned.call(gate.view!.runner, sql, parameters) as T);
    return gate.statement(sql, parameters, false) as Promise<T>;
  }

  /**
   * How many statements the session has sent so far (queries, and the BEGIN, COMMIT,
   * ROLLBACK and SAVEPOINT statements of its transactions are not counted).
   */
  get statements(): number {
    return this.#parts?.gate.statements ?? 0;
  }

  /** Whether a transaction is open on this session. */
  get inTransaction(): boolean {
    return this.#stack.visible > 0;
  }

  /** Whether the session has been closed (or is closing) and accepts no new work. */
  get closed(): boolean {
    return !this.#state.isOpen || this.#state.broken !== undefined;
  }

  /**
   * Aborted when the session closes (its block settled, it was removed or force
   * closed). Pass it to `fetch` and other cancellable work started by the block.
   */
  get signal(): AbortSignal {
    return this.#state.signal;
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
    const { tx } = this.#use();
    const handle = tx.ownTop("commit");
    try {
      await tx.beforeCommit(handle);
    } catch (error) {
      await this.#state.runCallbacks((await tx.exit(handle, false)).callbacks);
      throw error;
    }
    const outcome = await tx.exit(handle, true);
    await this.#state.runCallbacks(outcome.callbacks);
    if ("error" in outcome) throw outcome.error;
  }

  /**
   * Roll back the innermost open transaction (to its savepoint when nested), then
   * run its `afterRollback` callbacks.
   *
   * @throws {@link TransactionNotActiveError} (as a rejection) when no transaction is open
   */
  async rollback(): Promise<void> {
    const { tx } = this.#use();
    const outcome = await tx.exit(tx.ownTop("rollback"), false);
    await this.#state.runCallbacks(outcome.callbacks);
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
    this.#state.assertUsable(frame);
    const level = this.#stack.levelOf(frame);
    if (level === undefined || level.invisible) {
      if (level?.runAfterCommit === false) return;
      this.#use().closing.runNow(callback);
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
    this.#state.assertUsable(frame);
    const level = this.#stack.levelOf(frame);
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
    this.#state.assertUsable(frame);
    const level = this.#stack.levelOf(frame);
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
      this.#state.assertUsable(here);
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
    await this.#state.runCallbacks(await this.#use().closing.close());
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
  // Used by blocks and the registry. Not part of the public API: each hands the call
  // to the part of the session that does it (see the files imported above).

  /** @internal Whether work from `frame` is still accepted (open, or the closing block itself). */
  _usableFrom(frame: Frame | undefined): boolean {
    return this.#state.usableFrom(frame);
  }

  /** @internal The error for work that arrives too late. */
  _closedError(): SessionClosedError {
    return this.#state.closedError();
  }

  /** @internal Whether this session holds an open transaction on `lease`. */
  _holdsTransactionOn(lease: Lease<Session>): boolean {
    return this.#stack.size > 0 && this.#host.lease === lease;
  }

  /** @internal Whether the session is still waiting for its connection (the pool, or SQLite's lease). */
  _waitingForConnection(): boolean {
    return this.#parts?.gate.waitingForConnection ?? false;
  }

  /** @internal Whether a transaction is open, the invisible one of useTransactionalTests() included. */
  _inAnyTransaction(): boolean {
    return this.#stack.size > 0;
  }

  /** @internal Open a transaction level for a block running in `frame`, or join the open one. */
  _enter(frame: Frame | undefined, spec: LevelSpec): Promise<LevelHandle> {
    return this.#use().tx.enter(frame, spec);
  }

  /**
   * @internal End what {@link _enter} opened (`failure`: why its block failed). Never
   * rejects: failures come back as `error`.
   */
  _exit(handle: LevelHandle, commit: boolean, failure?: unknown): Promise<LevelOutcome> {
    return this.#use().tx.exit(handle, commit, failure);
  }

  /** @internal A block's body has resolved: run the `beforeCommit` callbacks of its outermost COMMIT. */
  _beforeCommit(handle: LevelHandle): Promise<void> {
    return this.#use().tx.beforeCommit(handle);
  }

  /** @internal A block that joined with `savepoint: false` failed: the joined level must not commit. */
  _markRollbackOnly(handle: LevelHandle, name: string | undefined): void {
    const { level, joined } = handle as Handle;
    if (joined) level.rollbackOnly ??= name ?? "an anonymous block";
  }

  /** @internal Run callbacks in order, reporting failures through `error`. */
  _runCallbacks(callbacks: readonly SessionCallback[]): Promise<void> {
    return this.#state.runCallbacks(callbacks);
  }

  /** @internal This session comes from `open()`: its caller closes it; `stop` ends its timeout. */
  _ownByCaller(stop: () => void): void {
    this.#callerOwned = stop;
  }

  /** @internal `holdConnection`: keep the pooled connection, once taken, until the session closes. */
  _holdConnection(): void {
    this.#use().gate.pinned = true;
  }

  /** @internal The final COMMIT or ROLLBACK starts: only its own work may use the session now. */
  _markClosing(): void {
    this.#state.markClosing();
  }

  /** @internal Close at once a session that never took its connection; false when there is more to do. */
  _closeIdle(): boolean {
    const parts = this.#parts;
    if (parts !== undefined) return parts.closing.closeIdle();
    if (!this.#state.isOpen || this.#state.waiting > 0) return false;
    this.#state.closeIdle();
    return true;
  }

  /** @internal Close; resolves to the `afterRollback` callbacks of what was rolled back (first caller only). */
  _close(): Promise<SessionCallback[]> {
    return this.#use().closing.close();
  }

  /** @internal Force the session closed now (a timeout, a drain). */
  _kill(reason: Error): Promise<void> {
    // Its spans end as the session closes: they say why first.
    if (!this.closed) this._trace?.abort(reason);
    return this.#use().closing.kill(reason);
  }

  /** @internal The outcome of a block's body, unless the session is force-closed first. */
  _guard<T>(outcome: T | Promise<T>): Promise<T> {
    return this.#state.guard(outcome);
  }

  /** @internal The session's request is over: close it as soon as nothing of it runs. */
  _closeWhenIdle(reason: RequestEnd, fresh: boolean): void {
    this.#use().closing.closeWhenIdle(reason, fresh);
  }

  /** @internal A block of an ended request runs on this session: it stays open until `work` settles. */
  _busyWith<T>(work: Promise<T>): Promise<T> {
    return this.#use().closing.busyWith(work);
  }
}

function assertCallback(callback: unknown, method: string): void {
  if (typeof callback !== "function") {
    throw new TypeError(
      `Expected the ${method}() callback to be a function, got \`${String(callback)}\` (${typeof callback})`,
    );
  }
}
