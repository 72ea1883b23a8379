import { SessionTimeoutError } from "../../errors.js";
import type { ConnectionGate } from "./gate.js";
import type { LevelStack, SessionCallback } from "./levels.js";
import type { RequestEnd } from "../scope.js";
import type { Session, SessionHost } from "./session.js";
import { CLOSED, OPEN, type SessionState } from "./state.js";
import type { Transactions } from "./transactions.js";

/**
 * How a session ends: closed by its block (or its caller), force-closed (a timeout, a
 * drain: blocks waiting on it settle at once), or — a request's session — closed as
 * soon as nothing of it runs once its request is over, and reopened if used again.
 */
export class SessionClosing {
  readonly #session: Session;
  readonly #host: SessionHost;
  readonly #state: SessionState;
  readonly #stack: LevelStack;
  readonly #gate: ConnectionGate;
  readonly #tx: Transactions;
  /** `afterCommit` callbacks run at once (outside a transaction) that have not finished. */
  readonly #running = new Set<Promise<void>>();
  /** Blocks of an ended request still running on this session. */
  #busy = 0;

  constructor(
    session: Session,
    host: SessionHost,
    parts: { state: SessionState; stack: LevelStack; gate: ConnectionGate; tx: Transactions },
  ) {
    this.#session = session;
    this.#host = host;
    this.#state = parts.state;
    this.#stack = parts.stack;
    this.#gate = parts.gate;
    this.#tx = parts.tx;
    parts.state.ending = this;
  }

  /** Run an `afterCommit` callback outside a transaction now; closing waits for it. */
  runNow(callback: SessionCallback): void {
    const running = this.#state.runCallbacks([callback]);
    this.#running.add(running);
    void running.finally(() => this.#running.delete(running));
  }

  /**
   * Close at once, without a promise, a session that never took its connection and
   * has nothing under way (the body never touched the database): the common case of
   * {@link close}, kept cheap. False when there is more to do.
   */
  closeIdle(): boolean {
    const state = this.#state;
    if (state.life !== OPEN || !this.#gate.idle || this.#stack.size > 0 || this.#running.size > 0) return false;
    state.closeIdle();
    return true;
  }

  /**
   * Close: roll back what is open, release the connection, abort the signal.
   * Idempotent. Resolves to the `afterRollback` callbacks of what was rolled back,
   * for the first caller only, so that they run once.
   */
  close(): Promise<SessionCallback[]> {
    const state = this.#state;
    if (state.closing !== undefined) return state.closing.then(() => []);
    state.closing = this.#closeOnce();
    return state.closing;
  }

  async #closeOnce(): Promise<SessionCallback[]> {
    const state = this.#state;
    state.markClosing();
    const gate = this.#gate;
    const callbacks: SessionCallback[] = [];
    let handedBack: Promise<void> | undefined;
    await state.asCloser(async () => {
      // A BEGIN or SAVEPOINT in flight finishes first, so that it is undone below; so do
      // statements in flight (cancelled first on a timeout), ahead of the ROLLBACK.
      while (this.#tx.starting !== undefined) await this.#tx.starting;
      await gate.answered();
      const stack = this.#stack;
      while (stack.size > 0 && state.broken === undefined) {
        const top = stack.top!;
        top.forced = true;
        if (top.begun || top.ending !== undefined) callbacks.push(...(await this.#tx.end(top, false)).callbacks);
        else stack.pop(top, "rolledBack"); // still waiting for the connection: nothing to undo
      }
      if (gate.releasing !== undefined) await gate.releasing;
      const release = gate.close();
      if (release !== undefined && "wait" in release) await release.wait;
      else handedBack = release?.handedBack;
    });
    this.#host.lease?.releaseAll(this.#session);
    while (this.#running.size > 0) await Promise.all(this.#running);
    state.life = CLOSED;
    state.abort();
    this.#state.wake();
    // The registry counts the session as open until its connection is back in the pool.
    const closed = (): void => this.#host.closed(this.#session, performance.now() - state.openedAt);
    if (handedBack === undefined) closed();
    else void handedBack.then(closed);
    return callbacks;
  }

  /**
   * Force the session closed now (a timeout, a drain): make the blocks waiting on it
   * reject, cancel the statement PostgreSQL is running for it, roll back, release.
   */
  async kill(reason: Error): Promise<void> {
    const state = this.#state;
    if (state.life === CLOSED) return;
    state.killed ??= reason;
    state.idleClosed = false;
    const killing = (async () => {
      if (this.#gate.inFlight.size > 0) await this.#gate.cancel();
      await state.runCallbacks(await this.close());
    })();
    // The blocks settle with this reason once the session is closed, whatever the
    // abandoned body runs into meanwhile.
    const error = reason instanceof SessionTimeoutError ? reason : state.closedError();
    state.settleGuards(error, killing);
    await killing;
  }

  /**
   * The session's request is over (`fresh`: it was made after that): close it as soon
   * as nothing of it runs — no block, statement, transaction or callback.
   */
  closeWhenIdle(reason: RequestEnd, fresh: boolean): void {
    this.#state.requestOver = reason;
    // A session made for one late use closes after it; give that use its chance first.
    if (fresh) setImmediate(() => this.closeIfIdle());
    else this.closeIfIdle();
  }

  /** A block of an ended request runs on this session: it stays open until `work` settles. */
  busyWith<T>(work: Promise<T>): Promise<T> {
    this.#busy += 1;
    const done = (): void => {
      this.#busy -= 1;
      this.closeIfIdle();
    };
    work.then(done, done);
    return work;
  }

  /** A request's session that is over: close it if nothing of it runs now. */
  closeIfIdle(): void {
    const state = this.#state;
    if (
      state.requestOver === undefined ||
      state.life !== OPEN ||
      this.#busy > 0 ||
      this.#gate.inFlight.size > 0 ||
      this.#stack.size > 0 ||
      this.#tx.starting !== undefined
    ) {
      return;
    }
    state.idleClosed = true;
    if (!this.closeIdle()) void this.close().then((callbacks) => state.runCallbacks(callbacks));
  }

  /**
   * A request's session that closed once idle, after its request was over, is used
   * again through a reference kept from before (`const s = currentSession()` in a
   * handler that goes on after the client left): like SQLAlchemy's Session after
   * `close()`, it starts afresh, and closes again as soon as that work is done. Not
   * after a timeout, a drain or a discarded connection.
   */
  reopen(): boolean {
    const state = this.#state;
    if (!this.#gate.reopen(true)) return false;
    if (!this.#host.reopened(this.#session)) return false;
    this.#gate.reopen(false);
    state.idleClosed = false;
    state.life = OPEN;
    state.closing = undefined;
    state.closer = undefined;
    state.openedAt = performance.now();
    // Nothing may keep it open now: close it again once this use is over.
    setImmediate(() => this.closeIfIdle());
    return true;
  }
}
