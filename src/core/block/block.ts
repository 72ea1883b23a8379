import { NoActiveSessionError, SessionClosedError } from "../../errors.js";
import { describe } from "../describe.js";
import type { RegistryHost } from "../registry/host.js";
import { assertSecondSessionAllowed, finish, timeout } from "./open.js";
import { resolveOptions, type ResolvedOptions } from "./option-checks.js";
import type { Propagation } from "./options.js";
import type { SessionRegistry } from "../registry/registry.js";
import { decidedOnce, retrying } from "./retry.js";
import { findScope, type Frame, type Scope, storage, wrote } from "../scope.js";
import { DROPPED, type Session, type SessionCallback } from "../session/session.js";

/** The body of a block: receives the session, returns a value or a promise of one. */
export type SessionBody<T> = (session: Session) => T | Promise<T>;

/**
 * How a block was asked for: `detached()` opens a fresh scope that inherits nothing;
 * `duringDrain` (detached too) also while the registry drains: bookkeeping covered by `_hold()`;
 * `replica`: its session runs on a replica (decided by {@link execute}).
 */
interface BlockOptions extends ResolvedOptions {
  readonly detached?: boolean;
  readonly duringDrain?: boolean;
  readonly replica?: boolean;
}

/** The propagation of a block, `detached()` as a mode of its own: it ignores `propagation`. */
type Mode = Propagation | "detached";

/** A transaction's commit or rollback leaves no callbacks in a block that has none. */
const NO_CALLBACKS: readonly SessionCallback[] = [];

/**
 * A block as the functions and registry methods take it: validate the body and
 * the options (rejecting, never throwing), then {@link execute}.
 *
 * @internal
 * @example
 * ```ts
 * return runBlock(defaultRegistry, fn, options, true); // withTransaction(fn, options)
 * ```
 */
export function runBlock<T>(
  bound: SessionRegistry,
  fn: SessionBody<T>,
  options: unknown,
  transactional: boolean,
  detached: boolean | "duringDrain" = false,
): Promise<T> {
  try {
    if (typeof fn !== "function") throw new TypeError(`Expected the block body to be a function, got ${describe(fn)}`);
    const opts = resolveOptions(options, fn.name === "" ? undefined : fn.name, transactional);
    if (detached === false) return execute(bound, fn, opts);
    return execute(bound, fn, { ...opts, detached: true, duringDrain: detached === "duringDrain" });
  } catch (error) {
    return Promise.reject(error);
  }
}

/**
 * The one core path. Every way of running code with a session (the block
 * functions, registry methods, decorators, middleware, cron tasks) ends here:
 * find or open the scope, run the body, and remove what this block opened before
 * settling. Decorators resolve their options once, when they are applied.
 *
 * @internal
 * @example
 * ```ts
 * return execute(registry, (session) => method.apply(this, [...args, session]), opts);
 * ```
 */
export async function execute<T>(bound: SessionRegistry, fn: SessionBody<T>, opts: BlockOptions): Promise<T> {
  const registry = opts.registry ?? bound;
  let ready = registry._ready();
  if (ready instanceof Promise) ready = await ready;
  const host = ready as RegistryHost;
  const here = storage.getStore();
  const mode: Mode = opts.detached === true ? "detached" : opts.propagation;
  // With `replicas`, a read-only block that would not join an open transaction runs on a replica.
  if (opts.readOnly && mode !== "mandatory" && onReplica(host, opts, here, registry)) {
    return openNew(registry, host, here, fn, { ...opts, replica: true });
  }
  switch (mode) {
    case "required": {
      // The scope's session (under useTransactionalTests(), the test's); outside every scope, a new one.
      const scope = findScope(here, registry);
      if (scope !== undefined) return join(scope, host, here, fn, opts);
      return openNew(registry, host, here, fn, opts);
    }
    case "requiresNew":
      // A session of its own, on its own connection, whatever the scope has.
      assertSecondSessionAllowed(here, host, opts.name, 'propagation "requiresNew"');
      return openNew(registry, host, here, fn, opts);
    case "mandatory": {
      const scope = findScope(here, registry);
      if (scope === undefined) {
        throw new NoActiveSessionError(
          registry.name,
          `A block with propagation "mandatory"${opts.name === undefined ? "" : ` (${opts.name})`}`,
        );
      }
      return join(scope, host, here, fn, opts);
    }
    case "detached":
      // A fresh scope that inherits nothing, whatever `propagation` says.
      assertSecondSessionAllowed(here, host, opts.name, "detached()");
      return openNew(registry, host, here, fn, opts);
  }
}

/**
 * With `replicas`: whether a read-only block runs on a replica. Not when it is nested in
 * an open transaction of its scope's session (it joins that, or a detached block leaves
 * it alone on the primary), nor once a scope it runs in has written on the primary (it
 * reads that scope's own writes there). Nor while the registry drains, which refuses new
 * sessions: work in flight goes on as without replicas. Nor for SERIALIZABLE on
 * PostgreSQL, whose hot standbys cannot run it.
 */
function onReplica(
  host: RegistryHost,
  opts: ResolvedOptions,
  here: Frame | undefined,
  registry: SessionRegistry,
): boolean {
  if (!host.replicated || host.draining) return false;
  if (opts.isolation === "SERIALIZABLE" && host.family === "postgres") return false;
  return findScope(here, registry)?.session?._inAnyTransaction() !== true && !wrote(here, registry);
}

/** Run the block on the session of `scope`, which outlives it. */
function join<T>(
  scope: Scope,
  host: RegistryHost,
  here: Frame | undefined,
  fn: SessionBody<T>,
  opts: BlockOptions,
): Promise<T> {
  const session = scopeSession(scope, host, opts.name);
  if (opts.holdConnection) session._holdConnection();
  const joined = joinSession(session, scope, here, fn, opts, host);
  // A request's session stays open, once the request is over, until its blocks have settled.
  return scope.over === undefined ? joined : session._busyWith(joined);
}

/** Run the block in a new scope with a new session, removed before the block settles. */
function openNew<T>(
  registry: SessionRegistry,
  host: RegistryHost,
  here: Frame | undefined,
  fn: SessionBody<T>,
  opts: BlockOptions,
): Promise<T> {
  if (opts.retry === undefined) return runOwned(registry, host, here, fn, opts, undefined);
  // Each attempt of a retried block is a new session: a failed COMMIT leaves its connection unusable.
  const retry = decidedOnce(opts.retry);
  const retried: BlockOptions = { ...opts, retry };
  return retrying(retry, (attempt) => runOwned(registry, host, here, fn, retried, attempt));
}

/**
 * One attempt of a block that owns its session: run the body in the session's scope,
 * then remove the session, whatever the body did, before settling; run the callbacks
 * its transaction left in the caller's context. Settles early when the session is
 * force-closed (`timeoutMs`, `drain()`).
 */
async function runOwned<T>(
  registry: SessionRegistry,
  host: RegistryHost,
  here: Frame | undefined,
  fn: SessionBody<T>,
  opts: BlockOptions,
  attempt: number | undefined,
): Promise<T> {
  const session = host.createSession(opts.name, opts.duringDrain, opts.replica);
  if (opts.holdConnection) session._holdConnection();
  const scope: Scope = { registry, session, ended: false };
  // A detached scope inherits nothing; it remembers where it came from only to detect a wait on itself.
  const frame: Frame = opts.detached === true ? { scope, parent: undefined, origin: here } : { scope, parent: here };
  // Only a transaction leaves callbacks for after the session is removed.
  const pending: SessionCallback[] | undefined = opts.transaction ? [] : undefined;
  const timer = timeout(session, host, opts.timeoutMs);
  try {
    return await guardedBody(session, frame, fn, opts, true, pending, attempt);
  } catch (error) {
    session._trace?.fail(error);
    throw error;
  } finally {
    clearTimeout(timer);
    const finishing = finish(scope, pending);
    if (finishing !== undefined) await finishing;
  }
}

/**
 * The body in `frame`, inside a transaction when the block asks for one (`owner`: the block owns the
 * session; `pending` is where the transaction's callbacks go), settling early when the session is
 * force-closed.
 */
function guardedBody<T>(
  session: Session,
  frame: Frame,
  fn: SessionBody<T>,
  opts: ResolvedOptions,
  owner: boolean,
  pending: SessionCallback[] | undefined,
  attempt: number | undefined,
): Promise<T> {
  return session._guard(
    pending === undefined
      ? storage.run(frame, callBody<T>, fn, session)
      : storage.run(frame, transactional<T>, session, frame, fn, opts, owner, pending, attempt),
  );
}

/**
 * `fn(session)`, for `storage.run()` to call without a closure made per block; when the
 * session is traced, with its innermost span active, so that the body's own spans nest under it.
 */
function callBody<T>(fn: SessionBody<T>, session: Session): T | Promise<T> {
  const trace = session._trace;
  return trace === undefined ? fn(session) : trace.run(fn, session);
}

/**
 * The session of `scope`, created on first use. In a request scope whose request is
 * over, a session that has closed is replaced by a new one, which closes as soon as
 * nothing of it runs (SQLAlchemy's `scoped_session` after `remove()`: the next use
 * simply gets a new session). Elsewhere an ended scope has no session to give.
 *
 * @internal
 * @example
 * ```ts
 * const session = scopeSession(scope, host, undefined); // registry.current()
 * ```
 */
export function scopeSession(scope: Scope, host: RegistryHost, name: string | undefined): Session {
  const session = scope.session;
  if (scope.over !== undefined && (session === undefined || session.closed)) {
    const fresh = host.createSession(name);
    scope.session = fresh;
    fresh._closeWhenIdle(scope.over, true);
    return fresh;
  }
  if (session !== undefined) return session;
  if (scope.ended)
    throw new SessionClosedError(`The session of registry "${scope.registry.name}"`, "its scope has ended");
  // A scope accepted before drain() began may still open its session while its work is under way.
  return (scope.session = host.createSession(name, scope.accepted === true));
}

/**
 * Run a block on a given session: directly when it is not transactional (and has
 * no timeout), else in a frame of its own that owns the transaction level it
 * opens. Also the path of TypeORM's `manager.transaction()` on a session's manager.
 *
 * @internal
 * @example
 * ```ts
 * return joinSession(session, scopeOf(storage.getStore(), session), storage.getStore(), fn, opts);
 * ```
 */
export async function joinSession<T>(
  session: Session,
  scope: Scope,
  here: Frame | undefined,
  fn: SessionBody<T>,
  opts: ResolvedOptions,
  host?: RegistryHost,
): Promise<T> {
  if (!session._usableFrom(here)) throw session._closedError();
  if (!opts.transaction && opts.timeoutMs === undefined) return callBody(fn, session);
  const frame: Frame = { scope, parent: here };
  // A joined block retries only as the outermost transaction of a session still usable.
  if (opts.retry === undefined || session.inTransaction) return runJoined(session, frame, fn, opts, host, undefined);
  const retry = decidedOnce(opts.retry);
  const retried: ResolvedOptions = { ...opts, retry };
  return retrying({ ...retry, retryOn: (error) => !session.closed && retry.retryOn(error) }, (attempt) =>
    runJoined(session, frame, fn, retried, host, attempt),
  );
}

/** One attempt of a joined block, in its own frame; its transaction's callbacks run before it settles. */
async function runJoined<T>(
  session: Session,
  frame: Frame,
  fn: SessionBody<T>,
  opts: ResolvedOptions,
  host: RegistryHost | undefined,
  attempt: number | undefined,
): Promise<T> {
  const pending: SessionCallback[] | undefined = opts.transaction ? [] : undefined;
  const timer = host === undefined ? undefined : timeout(session, host, opts.timeoutMs);
  try {
    return await guardedBody(session, frame, fn, opts, false, pending, attempt);
  } finally {
    clearTimeout(timer);
    await session._runCallbacks(pending ?? NO_CALLBACKS);
  }
}

/**
 * Open (or join) a transaction level, run the body, then commit or roll back.
 * `owner`: this block opened the session, so its COMMIT is also the session's end.
 */
async function transactional<T>(
  session: Session,
  frame: Frame,
  fn: SessionBody<T>,
  opts: ResolvedOptions,
  owner: boolean,
  pending: SessionCallback[],
  attempt: number | undefined,
): Promise<T> {
  const handle = await session._enter(frame, attempt === undefined ? opts : { ...opts, attempt });
  let value: T;
  try {
    value = await callBody(fn, session);
    await session._beforeCommit(handle);
  } catch (error) {
    session._markRollbackOnly(handle, opts.name);
    if (owner) session._markClosing();
    const outcome = await session._exit(handle, false, error);
    // A failed attempt that will be retried leaves nothing behind, its callbacks included.
    if (attempt === undefined || !opts.retry?.retryOn(error) || attempt > opts.retry.retries) {
      pending.push(...outcome.callbacks);
    } else {
      for (const callback of outcome.callbacks) (callback as { [DROPPED]?: () => void })[DROPPED]?.();
    }
    throw error;
  }
  if (owner) session._markClosing();
  const outcome = await session._exit(handle, true);
  pending.push(...outcome.callbacks);
  if ("error" in outcome) throw outcome.error;
  return value;
}
