import { SessionClosedError } from "../../errors.js";
import type { LevelStack, SessionCallback } from "./levels.js";
import { type Frame, isWithin, type RequestEnd, storage } from "../scope.js";
import type { Session, SessionHost } from "./session.js";

const NOTHING_ROLLED_BACK: Promise<SessionCallback[]> = Promise.resolve([]);

/** A block waiting on the session's body: settled by the body, or by a force-close first. */
interface Guard {
  killed: boolean;
  readonly reject: (error: unknown) => void;
}

/** What the state asks of a session's closing part, once it has one. */
interface Ending {
  reopen(): boolean;
  closeIfIdle(): void;
}

/**
 * Where a session is in its life, and so who may use it.
 *
 * ```text
 *            _markClosing()                 closed
 *   OPEN ─────────────────────▶ CLOSING ─────────────▶ CLOSED
 *    ▲   (block settled, close(),  │  only the closer frame     │
 *    │    timeout, drain)          │  (final COMMIT/ROLLBACK)   │
 *    │                             │  may use it                │
 *    └──────────── reopen: a request's session closed only because it was idle ──┘
 * ```
 *
 * `broken` (its connection discarded after a failed COMMIT or ROLLBACK) ends its
 * use in any state; `killed` says why it was force-closed (a timeout, a drain).
 */
export const OPEN = 0;
export const CLOSING = 1;
export const CLOSED = 2;
type Life = typeof OPEN | typeof CLOSING | typeof CLOSED;

/**
 * A session's life: its state, why it closed, its abort signal, and who may use it
 * now. The parts of a session (its connection gate, its transactions, its closing)
 * ask this before they do anything.
 */
export class SessionState {
  readonly session: Session;
  readonly #host: SessionHost;
  readonly #stack: LevelStack;
  life: Life = OPEN;
  openedAt = performance.now();
  /** Frame that runs the final COMMIT/ROLLBACK: its work is allowed while closing. */
  closer: Frame | undefined;
  /** Why the connection was discarded (a failed COMMIT or ROLLBACK): the session is finished. */
  broken: unknown;
  /** Why the session was force-closed (it timed out, or the registry was drained). */
  killed: Error | undefined;
  /** A request's session once its request is over: it closes as soon as nothing of it runs. */
  requestOver: RequestEnd | undefined;
  /** Closed (or closing) only because its request was over and nothing of it ran: it may reopen. */
  idleClosed = false;
  #abort: AbortController | undefined;
  /** Work waiting for its turn: until no level owned by another block is open. */
  #waiters: { frame: Frame | undefined; grant: () => void }[] | undefined;
  /** Blocks waiting on this session that must settle at once if it is force-closed. */
  #guards: Set<Guard> | undefined;
  /** The closing under way or done; resolves to the `afterRollback` callbacks of what it rolled back. */
  closing: Promise<SessionCallback[]> | undefined;
  /** The session's closing part, once it has one: reopens and closes a request's session. */
  ending: Ending | undefined;

  constructor(session: Session, host: SessionHost, stack: LevelStack) {
    this.session = session;
    this.#host = host;
    this.#stack = stack;
  }

  /** A request's session that is over: close it if nothing of it runs now. */
  idleCheck(): void {
    this.ending?.closeIfIdle();
  }

  /** Whether the session is open (not closing or closed). */
  get isOpen(): boolean {
    return this.life === OPEN;
  }

  /** The session is closing only because its request is over and it was idle: resolves when it may reopen. */
  reopening(): Promise<void> | undefined {
    return this.life === CLOSING && this.idleClosed ? this.closing!.then(() => undefined) : undefined;
  }

  /** Whether work from `frame` is still accepted (open, or the closing block itself). */
  usableFrom(frame: Frame | undefined): boolean {
    if (this.broken !== undefined) return false;
    if (this.life === OPEN) return true;
    if (this.life === CLOSED && this.idleClosed) return this.ending?.reopen() ?? false;
    return this.#inCloser(frame);
  }

  /** @throws {@link SessionClosedError} unless work from `frame` is accepted */
  assertUsable(frame: Frame | undefined): void {
    if (!this.usableFrom(frame)) throw this.closedError();
  }

  /**
   * Work from `frame` may run unless a transaction level owned by another block is
   * open; the session's own cleanup always may.
   */
  mayRun(frame: Frame | undefined): boolean {
    return this.#stack.allows(frame) || this.#inCloser(frame);
  }

  #inCloser(frame: Frame | undefined): boolean {
    return this.life === CLOSING && this.closer !== undefined && isWithin(frame, this.closer);
  }

  /** How many are waiting for their turn. */
  get waiting(): number {
    return this.#waiters?.length ?? 0;
  }

  /** Wait until {@link wake} lets work from `frame` run (or the session closes). */
  turn(frame: Frame | undefined): Promise<void> {
    return new Promise<void>((grant) => this.wait(frame, grant));
  }

  /** Call `grant` once work from `frame` may run (or the session closes). */
  wait(frame: Frame | undefined, grant: () => void): void {
    (this.#waiters ??= []).push({ frame, grant });
  }

  /** Wake waiters that may run now, in order; a granted level changes who may run next. */
  wake(): void {
    if (this.requestOver !== undefined) this.idleCheck();
    const waiting = this.#waiters;
    if (waiting === undefined || waiting.length === 0) return;
    this.#waiters = [];
    for (const waiter of waiting) {
      // A grant may wake again: a waiter that must go on waiting joins the current list.
      if (this.life !== OPEN || this.mayRun(waiter.frame)) waiter.grant();
      else (this.#waiters ??= []).push(waiter);
    }
  }

  /** Run `fn` as the closer while closing, so that its statements are let through. */
  asCloser<T>(fn: () => Promise<T>): Promise<T> {
    return this.life === CLOSING && this.closer !== undefined ? storage.run(this.closer, fn) : fn();
  }

  /** The error for work that arrives too late, saying why. */
  closedError(detail?: string): SessionClosedError {
    if (detail === undefined && this.killed !== undefined) detail = this.killed.message;
    if (detail === undefined && this.broken !== undefined) {
      detail = "its connection was discarded after a failed COMMIT or ROLLBACK";
    }
    const reason = detail === undefined ? this.requestOver : undefined;
    return new SessionClosedError(String(this.session), detail, reason);
  }

  /** Aborted when the session closes. */
  get signal(): AbortSignal {
    if (this.#abort === undefined) {
      this.#abort = new AbortController();
      if (this.life === CLOSED) this.#abort.abort(this.closedError());
    }
    return this.#abort.signal;
  }

  /** Abort {@link signal}, if anyone asked for it. */
  abort(): void {
    this.#abort?.abort(this.closedError());
  }

  /**
   * The session's final COMMIT or ROLLBACK starts: from now on only work that runs
   * inside that cleanup (the `closer` frame) may use the session.
   */
  markClosing(): void {
    if (this.life !== OPEN) return;
    this.life = CLOSING;
    // Inside the cleanup, the session is its own scope: TypeORM subscribers that run
    // during the final COMMIT or ROLLBACK may use it, and see it as current.
    const session = this.session;
    this.closer = { scope: { registry: session.registry, session, ended: false }, parent: storage.getStore() };
    this.#host.lease?.cancel(session, () => this.closedError());
    this.wake();
  }

  /** Close now a session that has nothing open, under way or waiting: the cheap, common close. */
  closeIdle(): void {
    this.life = CLOSED;
    this.closing = NOTHING_ROLLED_BACK;
    this.abort();
    this.#host.closed(this.session, performance.now() - this.openedAt);
  }

  /**
   * The outcome of a block's body, unless the session is force-closed first: then the
   * block rejects with the reason once the session is closed, and the body is abandoned.
   */
  guard<T>(outcome: T | Promise<T>): Promise<T> {
    if (!(outcome instanceof Promise)) return Promise.resolve(outcome);
    return new Promise<T>((resolve, reject) => {
      const guard: Guard = { killed: false, reject };
      const guards = (this.#guards ??= new Set());
      guards.add(guard);
      outcome.then(
        (value) => {
          guards.delete(guard);
          if (!guard.killed) resolve(value);
        },
        (error: unknown) => {
          guards.delete(guard);
          if (!guard.killed) reject(error);
        },
      );
    });
  }

  /** Force-closed: the guarded blocks reject with `error` once `closed` settles, whatever their bodies do. */
  settleGuards(error: unknown, closed: Promise<void>): void {
    for (const guard of this.#guards ?? []) {
      guard.killed = true;
      void closed.then(() => guard.reject(error));
    }
  }

  /** Run callbacks in order, reporting failures through the registry's `error` event. */
  async runCallbacks(callbacks: readonly SessionCallback[]): Promise<void> {
    if (callbacks.length === 0) return;
    for (const callback of callbacks) {
      try {
        await callback();
      } catch (error) {
        this.#host.reportError(this.session, error);
      }
    }
  }
}
