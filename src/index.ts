/**
 * Explicit session blocks for TypeORM: the session registry, the `withSession` and
 * `withTransaction` blocks, the decorators, {@link Session} and the errors.
 *
 * @module typeorm-scoped-session
 */
export {
  configureSessions,
  createSessionRegistry,
  defaultRegistry,
  SessionRegistry,
} from "./core/registry/registry.js";
export { parseUrl } from "./core/registry/registry-options.js";
export type {
  CommonRegistryOptions,
  DataSourceInput,
  DataSourceRegistryOptions,
  SessionRegistryOptions,
  UrlRegistryOptions,
} from "./core/registry/registry-options.js";
export type { SessionEvent, SessionEventName, SessionListener } from "./core/registry/events.js";
export type { TracingOption } from "./core/tracing/session-trace.js";
export type { SpanLike, TraceAttributes, TracerLike } from "./core/tracing/otel.js";
export type { DrainOptions, DrainResult, SessionStats } from "./core/registry/pool.js";
export {
  currentSession,
  openSession,
  tryCurrentSession,
  withSession,
  withTransaction,
} from "./core/block/functions.js";
export type { SessionBody } from "./core/block/block.js";
export { isRetryableError } from "./core/block/retry.js";
export type { IsolationLevel, OpenOptions, Propagation, RetryOptions, SessionOptions } from "./core/block/options.js";
export { Session } from "./core/session/session.js";
export { Transactional, UsesSession } from "./decorators/uses-session.js";
export type { SessionDecorator } from "./decorators/uses-session.js";
export { InjectSession } from "./decorators/inject-session.js";
export type { SessionCallback } from "./core/session/session.js";
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
