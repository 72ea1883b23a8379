import type { SessionBody } from "./block.js";
import { runBlock } from "./block.js";
import { openExplicit } from "./open.js";
import type { OpenOptions, SessionOptions } from "./options.js";
import { defaultRegistry, type SessionRegistry } from "../registry/registry.js";
import type { Session } from "../session/session.js";

/**
 * Run `fn` with a session: the scope's own when called inside one (propagation
 * `"required"`), else a new one that is removed (rolled back if needed, its
 * connection released) before the returned promise settles. Uses
 * {@link defaultRegistry} unless `options.registry` names another one.
 *
 * @param fn - the body; receives the session
 * @param options - see {@link SessionOptions}
 * @returns what `fn` returns, once the session it opened (if any) is removed
 * @throws TypeError/RangeError (as a rejection) when `fn` is not a function or on invalid options
 * @throws {@link PropagationError}, {@link NoActiveSessionError}, {@link SessionClosedError} (as rejections) where the options cannot be honoured
 * @throws {@link SessionTimeoutError} (as a rejection) when the block runs past `timeoutMs`
 * @throws {@link RegistryNotConfiguredError} (as a rejection) while the registry has no data source
 * @throws {@link RegistryClosedError} (as a rejection) when it needs a new session while the registry drains
 * @example
 * ```ts
 * const user = await withSession((s) => s.getRepository(User).findOneBy({ id }));
 * ```
 */
export function withSession<T>(fn: SessionBody<T>, options?: SessionOptions): Promise<T> {
  return runBlock(defaultRegistry, fn, options, false);
}

/**
 * {@link withSession} with `transaction: true`: begin before `fn`, commit when it
 * resolves, roll back and rethrow its error when it throws. Nested in an open
 * transaction it becomes a SAVEPOINT (see `savepoint`).
 *
 * @param fn - the body; receives the session
 * @param options - see {@link SessionOptions}
 * @returns what `fn` returns, after the COMMIT and the `afterCommit` callbacks
 * @throws TypeError/RangeError (as a rejection) when `fn` is not a function or on invalid options
 * @throws {@link PropagationError} (as a rejection) for `durable`, `isolation` or `readOnly` inside an open transaction
 * @throws {@link SessionTimeoutError} (as a rejection) when the block runs past `timeoutMs`
 * @throws {@link NoActiveSessionError}, {@link SessionClosedError}, {@link RegistryNotConfiguredError},
 *   {@link RegistryClosedError} (as rejections) as {@link withSession} does
 * @example
 * ```ts
 * await withTransaction(async (s) => {
 *   await s.getRepository(Account).decrement({ id: from }, "balance", amount);
 *   await s.getRepository(Account).increment({ id: to }, "balance", amount);
 * }, { isolation: "SERIALIZABLE" });
 * ```
 */
export function withTransaction<T>(fn: SessionBody<T>, options?: SessionOptions): Promise<T> {
  return runBlock(defaultRegistry, fn, options, true);
}

/**
 * The current scope's session of `registry` (default: {@link defaultRegistry}):
 * `(registry ?? defaultRegistry).current()`. Throws synchronously.
 *
 * @param registry - the registry to ask; default {@link defaultRegistry}
 * @returns the session of the innermost scope of `registry`, created on first call inside a
 *   {@link SessionRegistry.scope}
 * @throws {@link NoActiveSessionError} outside any scope
 * @throws {@link SessionClosedError} after the scope's block ended or while it commits
 * @throws {@link RegistryClosedError} when it has to create the scope's session while the registry drains
 * @example
 * ```ts
 * export async function findUser(id: number) {
 *   return currentSession().getRepository(User).findOneBy({ id });
 * }
 * ```
 */
export function currentSession(registry?: SessionRegistry): Session {
  return (registry ?? defaultRegistry).current();
}

/**
 * Like {@link currentSession}, but `undefined` outside any scope; never creates a
 * session: `(registry ?? defaultRegistry).tryCurrent()`. Throws synchronously.
 *
 * @param registry - the registry to ask; default {@link defaultRegistry}
 * @returns the session of the innermost scope of `registry`, or `undefined` when there is none
 *   (or the scope's session has not been created yet)
 * @throws {@link SessionClosedError} when the scope's session is closing or closed
 * @example
 * ```ts
 * function logContext() {
 *   return { session: tryCurrentSession()?.id }; // safe outside any scope
 * }
 * ```
 */
export function tryCurrentSession(registry?: SessionRegistry): Session | undefined {
  return (registry ?? defaultRegistry).tryCurrent();
}

/**
 * `registry.open(options)` of `options.registry` (default: `defaultRegistry`): a new
 * session that the caller owns and closes. See {@link SessionRegistry.open}.
 *
 * @param options - `registry`, `transaction`, `isolation`, `readOnly`, `timeoutMs`, `name`, `holdConnection`
 * @returns the open session
 * @example
 * ```ts
 * await using s = await openSession({ transaction: true });
 * await s.getRepository(User).save(user);
 * await s.commit();
 * ```
 */
export function openSession(options?: OpenOptions): Promise<Session> {
  return openExplicit(defaultRegistry, options);
}
