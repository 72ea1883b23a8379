import { SessionClosedError } from "../errors.js";
import type { LevelStack, SessionCallback } from "./levels.js";
import { type Frame, isWithin, type RequestEnd, storage } from "./scope.js";
import type { Session } from "./session.js";

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
  #waiters: { frame: Frame | undefined; grant: () => void }[] = [];
  /** The closing under way or done; resolves to the `afterRollback` callbacks of what it rolled back. */
  closing: Promise<SessionCallback[]> | undefined;
  /** Reopen an idle-closed request session (set by its closing part). */
  reopen: () => boolean = () => false;
  /** A request's session that is over checks whether it is idle now (set by its closing part). */
  idleCheck: () => void = () => undefined;

  constructor(session: Session, stack: LevelStack) {
    this.session = session;
    this.#stack = stack;
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
    if (this.life === CLOSED && this.idleClosed) return this.reopen();
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
    return this.#waiters.length;
  }

  /** Wait until {@link wake} lets work from `frame` run (or the session closes). */
  turn(frame: Frame | undefined): Promise<void> {
    return new Promise<void>((grant) => this.#waiters.push({ frame, grant }));
  }

  /** Call `grant` once work from `frame` may run (or the session closes). */
  wait(frame: Frame | undefined, grant: () => void): void {
    this.#waiters.push({ frame, grant });
  }

  /** Wake waiters that may run now, in order; a granted level changes who may run next. */
  wake(): void {
    if (this.requestOver !== undefined) this.idleCheck();
    if (this.#waiters.length === 0) return;
    const waiting = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiting) {
      if (this.life !== OPEN || this.mayRun(waiter.frame)) waiter.grant();
      else this.#waiters.push(waiter);
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
}
