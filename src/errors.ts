/**
 * Every error this library throws on its own account extends {@link SessionError}
 * and carries a stable `code`. Errors from the database or from your code pass
 * through unchanged.
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
 * Base class of the errors raised by typeorm-scoped-session.
 *
 * @example
 * ```ts
 * try { await withSession(work) } catch (e) {
 *   if (e instanceof SessionError) log.warn(e.code, e.message);
 * }
 * ```
 */
export abstract class SessionError extends Error {
  /** Stable code: compare against it rather than against the message. */
  abstract readonly code: SessionErrorCode;

  constructor(message: string, options?: ErrorOptions) {
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
 * removed, or it was force-closed. Late work must start its own block.
 */
export class SessionClosedError extends SessionError {
  readonly code = "ERR_SESSION_CLOSED";
  /** Label of the closed session, e.g. `session #12 (InvoiceJob.run)`. */
  readonly session: string;

  constructor(session: string, detail?: string) {
    super(
      `${session} is closed${detail ? ` (${detail})` : ""}: it accepts no new work once its block ` +
        `has ended or started to commit. Await all work inside the block, or start ` +
        `independent work with registry.detached() or a new withSession() outside it.`,
    );
    this.session = session;
  }
}

/** A block ran longer than its `timeoutMs`. */
export class SessionTimeoutError extends SessionError {
  readonly code = "ERR_SESSION_TIMEOUT";
  /** The limit that was exceeded, in milliseconds. */
  readonly timeoutMs: number;

  constructor(session: string, timeoutMs: number, detail?: string) {
    super(
      `${session} exceeded its timeoutMs of ${timeoutMs} ms${detail ? ` ${detail}` : ""}; its ` +
        `transaction was rolled back and its connection released. Raise timeoutMs or make ` +
        `the work shorter.`,
    );
    this.timeoutMs = timeoutMs;
  }
}

/** The registry has no data source yet. */
export class RegistryNotConfiguredError extends SessionError {
  readonly code = "ERR_REGISTRY_NOT_CONFIGURED";
  /** Name of the registry that has no data source. */
  readonly registryName: string;

  constructor(registryName: string) {
    super(
      `Registry "${registryName}" has no data source. Call configureSessions({ dataSource }) ` +
        `(or registry.configure(...)) at start-up, or pass dataSource/url to createSessionRegistry().`,
    );
    this.registryName = registryName;
  }
}

/** `configure()` was called while sessions of the registry are open. */
export class RegistryBusyError extends SessionError {
  readonly code = "ERR_REGISTRY_BUSY";
  /** Name of the registry that was asked to reconfigure. */
  readonly registryName: string;
  /** How many sessions were open. */
  readonly active: number;

  constructor(registryName: string, active: number) {
    super(
      `Registry "${registryName}" cannot be reconfigured while ${active} session(s) are open. ` +
        `Configure it at start-up, or await registry.drain() first.`,
    );
    this.registryName = registryName;
    this.active = active;
  }
}

/** The registry is draining or drained and refuses new sessions. */
export class RegistryClosedError extends SessionError {
  readonly code = "ERR_REGISTRY_CLOSED";
  /** Name of the draining or drained registry. */
  readonly registryName: string;

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
 * `isolation`/`readOnly` on a block that joins one, a second session on a
 * single-connection driver while the scope holds its transaction, or an inner
 * block with `savepoint: false` that failed while the outer block went on.
 */
export class PropagationError extends SessionError {
  readonly code = "ERR_PROPAGATION";
}

/** `commit()` or `rollback()` was called on a session with no open transaction. */
export class TransactionNotActiveError extends SessionError {
  readonly code = "ERR_NO_TRANSACTION";

  constructor(session: string, action: string) {
    super(
      `${session}: ${action}() was called but no transaction of this caller is open (none at all, or one ` +
        `that another block of the session still runs). Call begin() first, or let withTransaction() end it.`,
    );
  }
}
