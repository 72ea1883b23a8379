import type { EntityManager, QueryRunner } from "typeorm";
import { PropagationError } from "../../errors.js";
import { cancelStatement, canReconnect, discardConnection, isPlainSelect, reconnectable } from "../driver/driver.js";
import type { Lease } from "../driver/lease.js";
import type { LevelStack } from "./levels.js";
import { RunnerView, type ViewTarget } from "./runner-view.js";
import { type Frame, lineage, markWrote, storage } from "../scope.js";
import type { Session, SessionHost } from "./session.js";
import type { SessionState } from "./state.js";
import { queueOf, type StatementQueue } from "../driver/statement-queue.js";

/** `QueryRunner.query` as the gate calls it: one overload per result shape, the caller's choice passed on. */
type AnyQuery = (sql: string, parameters?: unknown[], structured?: boolean) => Promise<unknown>;

/**
 * A session's connection: takes it when a statement or a transaction needs it (from the
 * pool, or SQLite's one shared connection through the lease), lets statements through
 * one at a time and in order, makes concurrent blocks of one session take turns while
 * one of them owns the open transaction, and gives a pooled connection back as soon as
 * nothing needs it outside a transaction.
 */
export class ConnectionGate {
  readonly #session: Session;
  readonly #host: SessionHost;
  readonly #state: SessionState;
  readonly #stack: LevelStack;
  /** What the runner view hands its calls to (set once when the session is made). */
  viewTarget: ViewTarget | undefined;
  /** The driver's runner, its view and the EntityManager bound to the view, made on first use. */
  real: QueryRunner | undefined;
  view: RunnerView | undefined;
  manager: EntityManager | undefined;
  /** `true` once connected; the promise while connecting. */
  connected: Promise<void> | boolean = false;
  /** The pooled connection going back to the pool. */
  releasing: Promise<void> | undefined;
  /** Keep the pooled connection from first use until the session closes (`holdConnection`, streams). */
  pinned = false;
  /** Statements run so far. */
  statements = 0;
  /** The statement queue of the connection (SQLite's one shared runner: every session's). */
  #queue: StatementQueue | undefined;
  /** Statements queued or in flight on a pooled connection: they keep it. */
  #uses = 0;
  /**
   * Statements let through and not answered yet: waited for before a COMMIT or
   * ROLLBACK (and on PostgreSQL cancelled first on a timeout).
   */
  readonly inFlight = new Set<Promise<unknown>>();

  constructor(session: Session, host: SessionHost, state: SessionState, stack: LevelStack) {
    this.#session = session;
    this.#host = host;
    this.#state = state;
    this.#stack = stack;
  }

  /** Make the driver's runner, its view and manager (once). */
  open(): QueryRunner {
    if (this.real !== undefined) return this.real;
    // TypeORM's "slave" runner takes a connection from a replica's pool (`replication`).
    const real = this.#host.dataSource.driver.createQueryRunner(this.#session.replica ? "slave" : "master");
    const view = new RunnerView(real, this.viewTarget!, this.#host.lease !== undefined);
    const manager = this.#host.manager(view.runner, this.#session);
    this.real = real;
    this.view = view;
    this.manager = manager;
    // Subscribers of the driver's own events (BeforeQuery, AfterTransactionCommit...) see our manager.
    if (this.#host.lease === undefined) Object.assign(real, { manager: this.manager });
    return real;
  }

  /** Whether something still holds or waits for the connection. */
  get idle(): boolean {
    return this.connected === false && this.releasing === undefined && this.#state.waiting === 0;
  }

  /** Whether the session is still waiting for its connection (the pool, or SQLite's lease). */
  get waitingForConnection(): boolean {
    if (this.connected instanceof Promise) return true;
    const lease = this.#host.lease;
    return lease !== undefined && this.#stack.size > 0 && lease.holder !== this.#session;
  }

  /** Take the connection (once): from the pool, or mark the shared one taken. */
  connect(): Promise<void> | undefined {
    if (this.connected === true) return undefined;
    if (this.#host.lease !== undefined) {
      // The one shared connection is always open; taking the lease is what counts.
      this.connected = true;
      this.#host.emit("connect", this.#session);
      return undefined;
    }
    // Taken again while the last one is still being given back: after that.
    if (this.releasing !== undefined) return this.releasing.then(() => this.connect());
    if (this.connected === false) {
      const connecting = (async () => {
        // Traced: the pool's and driver's connect spans nest under the session's span too.
        const trace = this.#session._trace;
        const real = this.real!;
        await (trace === undefined ? real.connect() : trace.run(connectRunner, real));
        this.connected = true;
        this.#host.emit("connect", this.#session);
      })();
      this.connected = connecting;
      connecting.catch(() => {
        if (this.connected === connecting) this.connected = false;
      });
    }
    return this.connected;
  }

  /**
   * On a single-connection driver, take (or re-enter) the connection lease:
   * `undefined` when granted at once. A session that would wait for a transaction
   * held by its own enclosing scope would wait forever: that is a
   * {@link PropagationError}.
   */
  acquire(lease: Lease<Session>, shared = false): Promise<void> | undefined {
    const holder = lease.holder;
    if (holder !== undefined && holder !== this.#session && holder._holdsTransactionOn(lease)) {
      for (const f of lineage(storage.getStore())) {
        if (f.scope.session === holder || holder._test) {
          throw new PropagationError(
            `${String(this.#session)} needs the single connection of this ${this.#host.family} database, but the ` +
              `enclosing ${String(holder)} holds it in an open transaction, so it would wait forever. ` +
              `Use propagation "required", or start the work from afterCommit().`,
          );
        }
      }
    }
    // The first hold is the session's connect (synchronous).
    const waiting = lease.acquire(this.#session, shared);
    if (waiting === undefined) {
      void this.connect();
      return undefined;
    }
    return waiting.then(() => void this.connect());
  }

  /** Pooled drivers: wait until work from `frame` may run, then keep the connection until the session closes. */
  async hold(frame: Frame | undefined): Promise<void> {
    this.pinned = true;
    for (;;) {
      this.#state.assertUsable(frame);
      if (!this.#state.mayRun(frame)) await this.#state.turn(frame);
      else if (this.connected !== true) await this.connect();
      else return;
    }
  }

  /** Send a statement (a query, a BEGIN, a COMMIT...) when the connection is free: one at a time, in order. */
  send<T>(send: () => Promise<T>): Promise<T> {
    return (this.#queue ??= queueOf(this.real!)).run(send);
  }

  /** One of the session's own transaction statements: it has the connection, and waits only for the statements before it. */
  control(sql: string, parameters: unknown[] | undefined, structured: boolean): Promise<unknown> {
    const real = this.real!;
    return this.send(() => this.#query(real, real, sql, parameters, structured));
  }

  /** `real.query` with `this` = `target`, under the session's innermost span when it is traced. */
  #query(
    real: QueryRunner,
    target: QueryRunner,
    sql: string,
    parameters: unknown[] | undefined,
    structured: boolean,
  ): Promise<unknown> {
    const trace = this.#session._trace;
    if (trace === undefined) return callQuery(real, target, sql, parameters, structured);
    return trace.run(callQuery, real, target, sql, parameters, structured);
  }

  /** A statement of the session's user or of TypeORM: waits for its turn and the connection. */
  async statement(sql: string, parameters: unknown[] | undefined, structured: boolean): Promise<unknown> {
    const frame = storage.getStore();
    const state = this.#state;
    const reopening = state.reopening();
    if (reopening !== undefined) await reopening;
    const real = this.real ?? this.open();
    const host = this.#host;
    const lease = host.lease;
    this.statements += 1;
    // With `replicas`: a statement that may write, outside a read-only transaction, keeps the scope on the primary.
    if (host.replicated && !this.#session.replica && this.#stack.top?.readOnly !== true && !isPlainSelect(sql)) {
      markWrote(frame, this.#session.registry);
    }
    let running: Promise<unknown>;
    if (lease === undefined) {
      for (;;) {
        state.assertUsable(frame);
        if (state.mayRun(frame)) break;
        await this.#state.turn(frame);
      }
      // The connection is held from here until the last queued statement is answered
      // (or, inside a transaction, until its COMMIT or ROLLBACK).
      this.#uses += 1;
      running = this.send(async () => {
        state.assertUsable(frame);
        const connecting = this.connect();
        if (connecting !== undefined) await connecting;
        return this.#query(real, real, sql, parameters, structured);
      });
    } else {
      // Each pass waits for something (a turn, the lease) and checks again: whatever
      // changed meanwhile, the statement runs only when it may. Outside a transaction it
      // shares the lease with other such statements, which pipeline on the connection.
      for (;;) {
        state.assertUsable(frame);
        if (!state.mayRun(frame)) {
          await this.#state.turn(frame);
          continue;
        }
        const shared = this.#stack.size === 0;
        const waiting = this.acquire(lease, shared);
        if (waiting !== undefined) await waiting;
        if (state.usableFrom(frame) && state.mayRun(frame) && (!shared || this.#stack.size === 0)) break;
        lease.release(this.#session);
      }
      // The shared runner's query runs on this session's view, so that the events it
      // broadcasts (BeforeQuery, AfterQuery) carry this session's runner and manager even
      // while other sessions' statements run alongside.
      const view = this.view!.runner;
      running = this.send(() => {
        // Queued behind other sessions' statements: refused if this session was closed meanwhile.
        state.assertUsable(frame);
        return this.#query(real, view, sql, parameters, structured);
      });
    }
    this.inFlight.add(running);
    try {
      return await running;
    } finally {
      this.inFlight.delete(running);
      if (lease === undefined) {
        this.#uses -= 1;
        this.releaseIfUnused();
      } else {
        lease.release(this.#session);
      }
      if (state.requestOver !== undefined) state.idleCheck();
    }
  }

  /** Wait until every statement in flight has been answered. */
  async answered(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.allSettled(this.inFlight);
  }

  /**
   * Pooled drivers: outside a transaction the connection goes back to the pool as soon
   * as no statement of the session needs it (SQLAlchemy's Session holds one only for a
   * transaction), so that code mixing the session with `dataSource.manager` in one
   * request cannot exhaust the pool. Kept with `holdConnection`, and for drivers whose
   * runners cannot take a connection again after `release()`.
   */
  releaseIfUnused(): void {
    if (
      this.pinned ||
      this.#uses > 0 ||
      this.#stack.size > 0 ||
      this.connected !== true ||
      !this.#state.isOpen ||
      this.#host.lease !== undefined
    ) {
      return;
    }
    const real = this.real!;
    if (!canReconnect(real)) {
      this.pinned = true;
      return;
    }
    this.connected = false;
    this.releasing = (async () => {
      await this.#release(real);
      reconnectable(real);
      this.releasing = undefined;
    })();
  }

  /**
   * The session closes: give a pooled connection back (`wait` for it). One the pool has
   * not handed over yet (a timeout or a drain while waiting for it) is given back as soon
   * as it is (`handedBack`), without holding the session's closing up: releasing before
   * would leave it checked out for good. Call once {@link releasing} has settled.
   */
  close(): { wait: Promise<void> } | { handedBack: Promise<void> } | undefined {
    const real = this.real;
    if (real === undefined || this.connected === false || this.#state.broken !== undefined) return undefined;
    if (this.#host.lease !== undefined) return undefined;
    if (this.connected instanceof Promise) {
      return {
        handedBack: this.connected.then(
          () => this.#release(real),
          () => undefined,
        ),
      };
    }
    return { wait: this.#release(real) };
  }

  async #release(real: QueryRunner): Promise<void> {
    try {
      await real.release();
    } catch (error) {
      this.#host.reportError(this.#session, error);
    }
  }

  /** A request's session reopens: whether its pooled connection can be taken again (and make it so). */
  reopen(check: boolean): boolean {
    const real = this.real;
    const pooled = real !== undefined && this.#host.lease === undefined;
    if (!pooled || this.connected === false) return true;
    if (check) return canReconnect(real);
    reconnectable(real);
    this.connected = false;
    return true;
  }

  /**
   * Ask PostgreSQL to stop the statement this session's backend is running, from a
   * connection of its own (the pool may be exhausted), so that the ROLLBACK that follows
   * does not wait for it and the server does not keep working for nobody.
   */
  async cancel(): Promise<void> {
    try {
      await cancelStatement(this.#host.dataSource, this.real!);
    } catch (error) {
      this.#host.reportError(this.#session, error);
    }
  }

  /**
   * The connection failed a COMMIT or ROLLBACK. A pooled one is destroyed; the one
   * shared connection of SQLite cannot be, so it is rolled back as far as it goes
   * and TypeORM's view of it reset (only while this session holds it).
   */
  async discard(error: unknown): Promise<void> {
    const lease = this.#host.lease;
    if (lease === undefined || lease.holder === this.#session) {
      await discardConnection(this.real!, lease !== undefined, error);
    }
    lease?.releaseAll(this.#session);
  }
}

/** `real.query` called on `target`, for {@link SessionTrace.run} to call without a closure. */
function callQuery(
  real: QueryRunner,
  target: QueryRunner,
  sql: string,
  parameters: unknown[] | undefined,
  structured: boolean,
): Promise<unknown> {
  return (real.query as AnyQuery).call(target, sql, parameters, structured);
}

/** `real.connect()`, for {@link SessionTrace.run} to call without a closure. */
function connectRunner(real: QueryRunner): Promise<unknown> {
  return real.connect() as Promise<unknown>;
}
