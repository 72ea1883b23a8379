import type { DataSource } from "typeorm";
import { RegistryClosedError } from "../../errors.js";
import { describe } from "../describe.js";
import type { SessionEvents } from "./events.js";
import type { Session } from "../session/session.js";

/** Counters of a registry, from {@link SessionRegistry.stats}. */
export interface SessionStats {
  /** Sessions open now. */
  readonly active: number;
  /** Most sessions open at once. */
  readonly peak: number;
  /** Sessions opened since the registry was created. */
  readonly opened: number;
  /** Sessions closed since the registry was created. */
  readonly closed: number;
  /** Outermost transactions committed. */
  readonly commits: number;
  /** Outermost transactions rolled back. */
  readonly rollbacks: number;
  /** Blocks that ran past their `timeoutMs`. */
  readonly timeouts: number;
  /** Sessions reported through `leak`. */
  readonly leaks: number;
  /** Statements run by every session so far (see {@link Session.statements}). */
  readonly statements: number;
}

/** Options of {@link SessionRegistry.drain}. */
export interface DrainOptions {
  /**
   * How long to wait for open sessions to end by themselves before force-closing them.
   * @default no limit
   */
  timeoutMs?: number;
  /**
   * Destroy the DataSource at the end.
   * @default false
   */
  destroy?: boolean;
}

/** What {@link SessionRegistry.drain} did. */
export interface DrainResult {
  /** Sessions that ended by themselves during the wait. */
  readonly waited: number;
  /** Sessions force-closed (rolled back, released) after the wait. */
  readonly forced: number;
}

/** An open session's leak timer, and whether it fired. */
interface LeakWatch {
  timer?: NodeJS.Timeout;
  leaked?: boolean;
}

/** The leak watch of every session when leak detection is off. */
const NO_WATCH: LeakWatch = Object.freeze({});

/**
 * @internal The registry's book of its sessions, whichever DataSource they use: the
 * open ones with their leak timers, the counters of {@link SessionRegistry.stats}, and
 * what {@link SessionRegistry.drain} waits for. One per registry, so that the counters
 * run from its creation across `configure()`.
 */
export class SessionPool {
  readonly #registry: string;
  readonly #events: SessionEvents;
  #leakDetectionMs: number | undefined;
  #active = 0;
  #peak = 0;
  #opened = 0;
  #closed = 0;
  #commits = 0;
  #rollbacks = 0;
  #timeouts = 0;
  #leaks = 0;
  #statements = 0;
  /** Open sessions, with their leak timers. */
  readonly #open = new Map<Session, LeakWatch>();
  /** Set by drain(): no new sessions. */
  #draining = false;
  /** Resolved when the last open session closes and the last hold is given back, while drain() waits. */
  #idle: (() => void) | undefined;
  /** Work that drain() waits for besides open sessions (see {@link hold}). */
  #holds = 0;

  constructor(registry: string, events: SessionEvents, leakDetectionMs: number | undefined) {
    this.#registry = registry;
    this.#events = events;
    this.#leakDetectionMs = leakDetectionMs;
  }

  /** Sessions open now. */
  get active(): number {
    return this.#active;
  }

  /** Whether drain() has begun and {@link reopen} has not been called since. */
  get draining(): boolean {
    return this.#draining;
  }

  /** `configure()`: take new sessions again, with this `leakDetectionMs`. */
  reopen(leakDetectionMs: number | undefined): void {
    this.#leakDetectionMs = leakDetectionMs;
    this.#draining = false;
  }

  /** Throws {@link RegistryClosedError} once drain() has begun. */
  assertOpen(): void {
    if (this.#draining) throw new RegistryClosedError(this.#registry);
  }

  /** A session was created, or a closed request session is used again. */
  opened(session: Session): void {
    this.#opened += 1;
    this.#active += 1;
    if (this.#active > this.#peak) this.#peak = this.#active;
    this.#open.set(session, this.#leakWatch(session));
    this.#events.emit("open", session);
  }

  /** A session's connection is back in the pool: emit `close`, and wake drain() after the last one. */
  closed(session: Session, durationMs: number): void {
    const watch = this.#open.get(session);
    clearTimeout(watch?.timer);
    this.#open.delete(session);
    this.#active -= 1;
    this.#closed += 1;
    const statements = session.statements;
    // A reopened request session closes again: count only what it ran since.
    this.#statements += statements - session._counted;
    session._counted = statements;
    this.#events.emit(
      "close",
      session,
      watch?.leaked ? { durationMs, statements, leakReported: true } : { durationMs, statements },
    );
    if (this.#open.size === 0 && this.#holds === 0) this.#idle?.();
  }

  /** An outermost transaction ended (savepoints are not counted). */
  ended(outcome: "commit" | "rollback"): void {
    if (outcome === "commit") this.#commits += 1;
    else this.#rollbacks += 1;
  }

  /** A block ran past its timeoutMs. */
  timedOut(session: Session, durationMs: number): void {
    this.#timeouts += 1;
    this.#events.emit("timeout", session, { durationMs });
  }

  /** The counters now, see {@link SessionStats}. */
  stats(): SessionStats {
    return {
      active: this.#active,
      peak: this.#peak,
      opened: this.#opened,
      closed: this.#closed,
      commits: this.#commits,
      rollbacks: this.#rollbacks,
      timeouts: this.#timeouts,
      leaks: this.#leaks,
      statements: [...this.#open.keys()].reduce(
        (sum, session) => sum + session.statements - session._counted,
        this.#statements,
      ),
    };
  }

  /**
   * Make drain() wait, as for an open session, until the returned function is called
   * (once or more); `undefined` once drain() has begun.
   */
  hold(): (() => void) | undefined {
    if (this.#draining) return undefined;
    this.#holds += 1;
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.#holds -= 1;
      if (this.#holds === 0 && this.#open.size === 0) this.#idle?.();
    };
  }

  /**
   * Refuse new sessions, wait for the open ones (and the holds) up to `timeoutMs`, then
   * force-close those left; with `destroy`, destroy the DataSource the registry has by then.
   */
  async drain(options: DrainOptions, dataSource: () => DataSource | undefined): Promise<DrainResult> {
    if (typeof options !== "object" || options === null) {
      throw new TypeError(`Expected drain options to be an object, got ${describe(options)}`);
    }
    const { timeoutMs, destroy = false } = options;
    if (timeoutMs !== undefined && (typeof timeoutMs !== "number" || !(timeoutMs >= 0))) {
      throw new RangeError(
        `Expected \`timeoutMs\` to be a number of milliseconds from 0 up, got ${describe(timeoutMs)}`,
      );
    }
    if (typeof destroy !== "boolean")
      throw new TypeError(`Expected \`destroy\` to be a boolean, got ${describe(destroy)}`);
    this.#draining = true;
    const before = [...this.#open.keys()];
    if (before.length > 0 || this.#holds > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        new Promise<void>((resolve) => (this.#idle = resolve)),
        ...(timeoutMs === undefined ? [] : [new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)))]),
      ]);
      clearTimeout(timer);
      this.#idle = undefined;
    }
    const left = [...this.#open.keys()];
    // Sessions let through during the wait (see hold) did not count as waited for.
    const waited = before.filter((session) => !this.#open.has(session)).length;
    await Promise.all(
      left.map((session) => session._kill(new Error(`force-closed by registry "${this.#registry}" drain()`))),
    );
    const initialized = dataSource();
    if (destroy && initialized?.isInitialized) await initialized.destroy();
    return { waited, forced: left.length };
  }

  /** With `leakDetectionMs`: remember where the session was opened, and report it once if it stays open. */
  #leakWatch(session: Session): LeakWatch {
    const limit = this.#leakDetectionMs;
    if (limit === undefined) return NO_WATCH;
    const traceLimit = Error.stackTraceLimit;
    Error.stackTraceLimit = 30; // past this library's own frames, to the application's
    const stack = new Error(`${String(session)} opened here`).stack;
    Error.stackTraceLimit = traceLimit;
    const watch: LeakWatch = {};
    watch.timer = setTimeout(() => {
      watch.leaked = true;
      this.#leaks += 1;
      this.#events.emit("leak", session, { stack, durationMs: limit });
    }, limit);
    watch.timer.unref();
    return watch;
  }
}
