/**
 * Explicit session blocks for TypeORM: the session registry, the `withSession` and
 * `withTransaction` blocks, the decorators, {@link Session} and the errors.
 *
 * @module typeorm-scoped-session
 */
export { configureSessions, createSessionRegistry, defaultRegistry, SessionRegistry } from "./core/registry.js";
export { parseUrl } from "./core/registry-options.js";
export type {
  CommonRegistryOptions,
  DataSourceInput,
  DataSourceRegistryOptions,
  SessionRegistryOptions,
  UrlRegistryOptions,
} from "./core/registry-options.js";
export type { SessionEvent, SessionEventName, SessionListener } from "./core/events.js";
export type { DrainOptions, DrainResult, SessionStats } from "./core/pool.js";
export { currentSession, openSession, tryCurrentSession, withSession, withTransaction } from "./core/functions.js";
export type { SessionBody } from "./core/block.js";
export { isRetryableError } from "./core/options.js";
export type { IsolationLevel, OpenOptions, Propagation, RetryOptions, SessionOptions } from "./core/options.js";
export { Session } from "./core/session.js";
export { Transactional, UsesSession } from "./decorators/uses-session.js";
export type { SessionDecorator } from "./decorators/uses-session.js";
export { InjectSession } from "./decorators/inject-session.js";
export type { SessionCallback } from "./core/session.js";
export {
  NoActiveSessionError,
  PropagationError,
  RegistryBusyError,
  RegistryClosedError,
  RegistryNotConfiguredError,
  SessionClosedError,
  SessionError,
  SessionTimeoutError,
  TransactionNotActiveError,
} from "./errors.js";
export type { SessionErrorCode } from "./errors.js";
