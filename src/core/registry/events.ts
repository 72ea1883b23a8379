import { describe } from "../describe.js";
import type { Session } from "../session/session.js";

/**
 * Payload of every registry event: the one argument a {@link SessionListener} gets.
 *
 * @example
 * ```ts
 * db.on("leak", ({ session, name, durationMs, stack }) => {
 *   log.warn(`session #${session.id} (${name}) open for over ${durationMs} ms, opened at\n${stack}`);
 * });
 * ```
 */
export interface SessionEvent {
  /** The session concerned; use `session.id` to correlate events. */
  readonly session: Session;
  /** The session's label (its `name` option or method name). */
  readonly name: string | undefined;
  /**
   * On `commit`, `rollback` and `close`: how long the transaction or session lasted; on
   * `timeout`: how long the block ran; on `leak`: the `leakDetectionMs` it exceeded.
   */
  readonly durationMs?: number;
  /** On `error` (and on a `rollback` caused by a failed COMMIT): what went wrong. */
  readonly error?: unknown;
  /** On `begin`, `commit` and `rollback`: whether this was a savepoint of an outer transaction. */
  readonly savepoint?: boolean;
  /** On `leak`: the stack trace of the code that opened the session. */
  readonly stack?: string;
  /** On `begin`, `commit` and `rollback` of a block run with `retry`: the attempt, from 1. */
  readonly attempt?: number;
  /** On `close`: the session had been reported through `leak`. */
  readonly leakReported?: boolean;
  /** On `close`: how many statements the session ran. */
  readonly statements?: number;
}

/**
 * Names of registry events: `open` (a session was created), `connect` (it took a
 * connection), `begin`, `commit`, `rollback` (of a transaction or savepoint), `close`,
 * `timeout` (a block ran past its `timeoutMs`), `leak` (a session stayed open longer
 * than `leakDetectionMs`) and `error` (a failure that could not be thrown to anyone).
 */
export type SessionEventName =
  "open" | "connect" | "begin" | "commit" | "rollback" | "close" | "timeout" | "leak" | "error";

/** A listener of registry events, added with {@link SessionRegistry.on}. */
export type SessionListener = (event: SessionEvent) => void;

/** @internal Every event name, in the order the docs list them. */
export const EVENT_NAMES: readonly SessionEventName[] = [
  "open",
  "connect",
  "begin",
  "commit",
  "rollback",
  "close",
  "timeout",
  "leak",
  "error",
];

/**
 * @internal What each event carries besides `session` and `name`, so that an event
 * emitted with the wrong fields does not compile.
 */
export interface EventDetails {
  open: undefined;
  connect: undefined;
  begin: Pick<SessionEvent, "savepoint" | "attempt">;
  commit: Pick<SessionEvent, "savepoint" | "durationMs" | "attempt">;
  rollback: Pick<SessionEvent, "savepoint" | "durationMs" | "attempt" | "error">;
  close: { readonly durationMs: number; readonly statements: number; readonly leakReported?: true };
  timeout: { readonly durationMs: number };
  leak: { readonly durationMs: number; readonly stack: string | undefined };
  error: { readonly error: unknown };
}

/** @internal The details argument of {@link SessionEvents.emit}: none for `open` and `connect`. */
export type DetailsArgument<E extends SessionEventName> = EventDetails[E] extends undefined ? [] : [EventDetails[E]];

/**
 * @internal A registry's listeners, per event name. Listeners run synchronously in the
 * order they were added; one that throws is reported through `error`, and an `error`
 * nobody listens to (or whose listener throws) becomes a process warning.
 */
export class SessionEvents {
  readonly #registry: string;
  readonly #listeners = new Map<SessionEventName, SessionListener[]>();

  /** @param registry - the registry's name, for the process warnings */
  constructor(registry: string) {
    this.#registry = registry;
  }

  on(event: SessionEventName, listener: SessionListener): void {
    if (!EVENT_NAMES.includes(event)) {
      throw new RangeError(`Expected an event name (${EVENT_NAMES.join(", ")}), got ${describe(event)}`);
    }
    if (typeof listener !== "function") {
      throw new TypeError(`Expected the listener to be a function, got ${describe(listener)}`);
    }
    // A new array, so that a listener added or removed during an emit takes effect on the next one.
    this.#listeners.set(event, [...(this.#listeners.get(event) ?? []), listener]);
  }

  off(event: SessionEventName, listener: SessionListener): void {
    const list = this.#listeners.get(event);
    if (list !== undefined)
      this.#listeners.set(
        event,
        list.filter((l) => l !== listener),
      );
  }

  emit<E extends SessionEventName>(event: E, session: Session, ...[details]: DetailsArgument<E>): void {
    const listeners = this.#listeners.get(event);
    if (listeners === undefined || listeners.length === 0) {
      if (event === "error") this.#warn(session, (details as EventDetails["error"]).error);
      return;
    }
    const payload: SessionEvent = { session, name: session.name, ...details };
    for (const listener of listeners) {
      try {
        listener(payload);
      } catch (error) {
        if (event === "error") this.#warn(session, error);
        else this.emit("error", session, { error });
      }
    }
  }

  #warn(session: Session, error: unknown): void {
    process.emitWarning(
      `typeorm-scoped-session: ${String(session)} of registry "${this.#registry}": ${error instanceof Error ? (error.stack ?? error.message) : String(error)}` +
        ` (add an "error" listener to the registry to handle this yourself)`,
      { code: "TYPEORM_SCOPED_SESSION_ERROR" },
    );
  }
}
