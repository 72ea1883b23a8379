/**
 * The errors this library raises about sessions, scopes, registries and
 * transactions extend {@link SessionError} and carry a stable `code`; invalid
 * arguments are `TypeError` or `RangeError` naming the argument and the value
 * received. Errors from the database or from your code pass through unchanged.
 *
 * @module
 */

/** Stable machine-readable codes of {@link SessionError} subclasses. */
export type SessionErrorCode =
  | "ERR_NO_ACTIVE_SESSION"
  | "ERR_SESSION_CLOSED"
  | "ERR_SESSION_TIMEOUT"
  | "ERR_REGISTRY_NOT_CONFIGURED"
  | "ERR_REGISTRY_BUSY"
  | "ERR_REGISTRY_CLOSED"
  | "ERR_PROPAGATION"
  | "ERR_NO_TRANSACTION";

/**
 * Base class of the errors raised by typeorm-scoped-session. Test a caught error
 * with `instanceof` (this class or a subclass) or compare its stable `code`;
 * never parse the message.
 *
 * @example
 * ```ts
 * try {
 *   await withTransaction(settle, { timeoutMs: 5_000 });
 * } catch (e) {
 *   if (e instanceof SessionTimeoutError) return res.status(503).end();
 *   if (e instanceof SessionError && e.code === "ERR_PROPAGATION") log.error(e.message);
 *   throw e;
 * }
 * ```
 */
export abstract class SessionError extends Error {
  /** Stable code: compare against it rather than against the message. */
  abstract readonly code: SessionErrorCode;

  /** @hidden */
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * There is no session scope where one is required: `currentSession()`, a scoped
 * proxy, or a block with `propagation: "mandatory"` used outside any block.
 */
export class NoActiveSessionError extends SessionError {
  readonly code = "ERR_NO_ACTIVE_SESSION";
  /** Name of the registry that was asked. */
  readonly registryName: string;

  /** @hidden */
  constructor(registryName: string, what = "currentSession()") {
    super(
      `${what} was called outside a session scope of registry "${registryName}". ` +
        `Run the code inside withSession()/withTransaction(), a method decorated with ` +
        `@UsesSession()/@Transactional(), or a request handled by the session middleware ` +
        `(sessionMiddleware for Express, koaSession for Koa).`,
    );
    this.registryName = registryName;
  }
}

/**
 * The session is closing or closed: its block has ended (or is committing), it was
 * removed, or it was force-closed. Late work must start its own block. A request's
 * session kept past the end of its request says why in {@link SessionClosedError.reason}.
 */
export class SessionClosedError extends SessionError {
  readonly code = "ERR_SESSION_CLOSED";
  /** Label of the closed session, e.g. `session #12 (InvoiceJob.run)`. */
  readonly session: string;
  /**
   * Set when the session was a web request's and closed because the request was over:
   * `"response-finished"` or `"client-disconnected"`. Handy to filter these out of error
   * reports: `if (error.reason === "client-disconnected") return;`.
   */
  readonly reason: "response-finished" | "client-disconnected" | undefined;

  /** @hidden */
  constructor(session: string, detail?: string, reason?: "response-finished" | "client-disconnected") {
    super(
      reason === undefined
        ? detail?.includes("drain()") === true
          ? `${session} is closed (${detail}): the registry is shutting down, and drain() force-closed ` +
            `the sessions still open when its timeoutMs ran out, rolling back their transactions. Give ` +
            `drain() a longer timeoutMs, or stop taking work (server.close(), worker.close()) before it.`
          : `${session} is closed${detail ? ` (${detail})` : ""}: it accepts no new work once its block ` +
            `has ended or started to commit. Await all work inside the block, or start ` +
            `independent work with registry.detached() or a new withSession() outside it.`
        : `${session} is closed (${reason === "client-disconnected" ? "the client disconnected" : "the response finished"}): ` +
            `a request's session closes once the request is over and nothing of it runs. Get the ` +
            `session anew for each use (the registry's repositories and manager, currentSession()), ` +
            `which gives a new one, or start work that must outlive the request with registry.detached().`,
    );
    this.session = session;
    this.reason = reason;
  }
}

/**
 * A block ran longer than its `timeoutMs`. The block rejects with it once its
 * session is closed: the transaction rolled back, the connection released.
 */
export class SessionTimeoutError extends SessionError {
  readonly code = "ERR_SESSION_TIMEOUT";
  /** The limit that was exceeded, in milliseconds. */
  readonly timeoutMs: number;

  /** @hidden */
  constructor(session: string, timeoutMs: number, detail?: string) {
    super(
      `${session} exceeded its timeoutMs of ${timeoutMs} ms${detail ? ` ${detail}` : ""}; its ` +
        `transaction was rolled back and its connection released. Raise timeoutMs or make ` +
        `the work shorter.`,
    );
    this.timeoutMs = timeoutMs;
  }
}

/**
 * The registry has no data source yet: give it one with {@link configureSessions},
 * {@link SessionRegistry.configure}, or the `dataSource`/`url` option of
 * {@link createSessionRegistry}.
 */
export class RegistryNotConfiguredError extends SessionError {
  readonly code = "ERR_REGISTRY_NOT_CONFIGURED";
  /** Name of the registry that has no data source. */
  readonly registryName: string;

  /** @hidden */
  constructor(registryName: string) {
    super(
      `Registry "${registryName}" has no data source. Call configureSessions({ dataSource }) ` +
        `(or registry.configure(...)) at start-up, or pass dataSource/url to createSessionRegistry().`,
    );
    this.registryName = registryName;
  }
}

/**
 * {@link SessionRegistry.configure} (or {@link configureSessions}) was called while
 * sessions of the registry are open.
 */
export class RegistryBusyError extends SessionError {
  readonly code = "ERR_REGISTRY_BUSY";
  /** Name of the registry that was asked to reconfigure. */
  readonly registryName: string;
  /** How many sessions were open. */
  readonly active: number;

  /** @hidden */
  constructor(registryName: string, active: number) {
    super(
      `Registry "${registryName}" cannot be reconfigured while ${active} session(s) are open. ` +
        `Configure it at start-up, or await registry.drain() first.`,
    );
    this.registryName = registryName;
    this.active = active;
  }
}

/**
 * The registry is draining or drained ({@link SessionRegistry.drain}) and refuses
 * new sessions; {@link SessionRegistry.configure} opens it again.
 */
export class RegistryClosedError extends SessionError {
  readonly code = "ERR_REGISTRY_CLOSED";
  /** Name of the draining or drained registry. */
  readonly registryName: string;

  /** @hidden */
  constructor(registryName: string) {
    super(
      `Registry "${registryName}" is draining or closed and opens no new sessions. ` +
        `Stop accepting work before calling drain().`,
    );
    this.registryName = registryName;
  }
}

/**
 * A block's propagation cannot be honoured: `durable` inside a transaction,
 * `isolation`/`readOnly` on a block that joins one, a second session
 * (`requiresNew`, `detached()`) on a single-connection driver while the scope
 * holds its transaction, or an inner block with `savepoint: false` that failed
 * while the outer block went on.
 */
export class PropagationError extends SessionError {
  readonly code = "ERR_PROPAGATION";
}

/**
 * {@link Session.commit} or {@link Session.rollback} was called with no open
 * transaction of the caller (none at all, or one that another block of the
 * session still runs).
 */
export class TransactionNotActiveError extends SessionError {
  readonly code = "ERR_NO_TRANSACTION";

  /** @hidden */
  constructor(session: string, action: string) {
    super(
      `${session}: ${action}() was called but no transaction of this caller is open (none at all, or one ` +
        `that another block of the session still runs). Call begin() first, or let withTransaction() end it.`,
    );
  }
}
