import { NoActiveSessionError, PropagationError, SessionClosedError, SessionTimeoutError } from "../errors.js";
import { describe, resolveOpenOptions, resolveOptions, type ResolvedOptions, type ResolvedRetry } from "./options.js";
import type { RegistryHost } from "./host.js";
import type { SessionRegistry } from "./registry.js";
import { findScope, type Frame, lineage, type RequestEnd, type Scope, storage } from "./scope.js";
import { DROPPED, type Session, type SessionCallback } from "./session.js";

/** The body of a block: receives the session, returns a value or a promise of one. */
export type SessionBody<T> = (session: Session) => T | Promise<T>;

/**
 * How a block was asked for: `detached()` opens a fresh scope that inherits nothing;
 * `duringDrain` (detached too) also while the registry drains: bookkeeping covered by `_hold()`.
 */
interface BlockOptions extends ResolvedOptions {
  readonly detached?: boolean;
  readonly duringDrain?: boolean;
}

/**
 * A block as the functions and registry methods take it: validate the body and
 * the options (rejecting, never throwing), then {@link execute}.
 *
 * @internal
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
 */
export async function execute<T>(bound: SessionRegistry, fn: SessionBody<T>, opts: BlockOptions): Promise<T> {
  const registry = opts.registry ?? bound;
  let ready = registry._ready();
  if (ready instanceof Promise) ready = await ready;
  const host = ready as RegistryHost;
  const here = storage.getStore();
  const scope = opts.detached === true ? undefined : findScope(here, registry);
  if (scope !== undefined && opts.propagation !== "requiresNew") {
    const session = scopeSession(scope, host, opts.name);
    if (opts.holdConnection) session._holdConnection();
    const joined = joinSession(session, scope, here, fn, opts, host);
    // A request's session stays open, once the request is over, until its blocks have settled.
    return scope.over === undefined ? joined : session._busyWith(joined);
  }
  if (opts.propagation === "mandatory" && opts.detached !== true) {
    throw new NoActiveSessionError(
      registry.name,
      `A block with propagation "mandatory"${opts.name === undefined ? "" : ` (${opts.name})`}`,
    );
  }
  if (opts.propagation === "requiresNew" || opts.detached === true) {
    assertSecondSessionAllowed(
      here,
      host,
      opts.name,
      opts.detached === true ? "detached()" : 'propagation "requiresNew"',
    );
  }
  const retry = opts.retry === undefined ? undefined : decidedOnce(opts.retry);
  const open = (attempt: number | undefined): Promise<T> => {
    const session = host.createSession(opts.name, opts.duringDrain);
    if (opts.holdConnection) session._holdConnection();
    const scope: Scope = { registry, session, ended: false };
    // A detached scope inherits nothing; it remembers where it came from only to detect a wait on itself.
    const frame: Frame = opts.detached === true ? { scope, parent: undefined, origin: here } : { scope, parent: here };
    const pending: SessionCallback[] = [];
    return settle(scope, host, pending, opts.timeoutMs, () =>
      storage.run(frame, () =>
        opts.transaction ? transactional(session, frame, fn, { ...opts, retry }, true, pending, attempt) : fn(session),
      ),
    );
  };
  // Each attempt of a retried block is a new session: a failed COMMIT leaves its connection unusable.
  return retry === undefined ? open(undefined) : retrying(retry, open);
}

/**
 * The session of `scope`, created on first use. In a request scope whose request is
 * over, a session that has closed is replaced by a new one, which closes as soon as
 * nothing of it runs (SQLAlchemy's `scoped_session` after `remove()`: the next use
 * simply gets a new session). Elsewhere an ended scope has no session to give.
 *
 * @internal
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
  return (scope.session = host.createSession(name));
}

/** The ready host of `registry`, refusing new work once it drains. */
async function readyHost(registry: SessionRegistry): Promise<RegistryHost> {
  const ready = registry._ready();
  const host = (ready instanceof Promise ? await ready : ready) as RegistryHost;
  host.assertOpen();
  return host;
}

/** `registry.scope(fn)`: a new scope whose session is created on first use. @internal */
export async function openScope<T>(registry: SessionRegistry, fn: () => T | Promise<T>): Promise<T> {
  if (typeof fn !== "function") throw new TypeError(`Expected the scope body to be a function, got ${describe(fn)}`);
  const test = registry._testScope;
  // Under useTransactionalTests() a request's scope is the test's: same session, same transaction.
  if (test !== undefined) return storage.run({ scope: test, parent: storage.getStore() }, fn);
  const host = await readyHost(registry);
  const scope: Scope = { registry, session: undefined, ended: false };
  return settle(scope, host, [], undefined, () => storage.run({ scope, parent: storage.getStore() }, fn));
}

/**
 * `registry.open()` / `openSession()`: a new session that the caller owns and closes
 * (`close()`, `await using`). Bound to no scope; with `transaction` it begins at once,
 * and what is left uncommitted is rolled back when it closes.
 *
 * @internal
 */
export async function openExplicit(bound: SessionRegistry, options: unknown): Promise<Session> {
  const opts = resolveOpenOptions(options);
  const host = await readyHost(opts.registry ?? bound);
  assertSecondSessionAllowed(storage.getStore(), host, opts.name, "open()");
  const session = host.createSession(opts.name);
  if (opts.holdConnection) session._holdConnection();
  const timer = timeout(session, host, opts.timeoutMs);
  session._ownByCaller(() => clearTimeout(timer));
  if (opts.transaction) {
    try {
      // No owner frame: whoever holds the session may use and end this transaction.
      await session._enter(undefined, opts);
    } catch (error) {
      await session.close();
      throw error;
    }
  }
  return session;
}

/**
 * The scope of one web request, the one path of every web integration. `body` runs
 * at once in a new scope whose session is created on first use, and gets `end`, to
 * call (once or more: the first reason counts) when the request is over: the
 * response has finished or the client has gone away.
 *
 * Unlike a block's scope, a request's scope cannot know when the handlers' work is
 * done (an Express handler returns nothing to wait for), so its end does not cut that
 * work off: from `end` on, the session closes as soon as nothing of it runs — no
 * block, no statement, no transaction open — so a block still running ends as its
 * body says (commits or rolls back) first. Later use of the scope (the registry's
 * proxies, `current()`, a joining block) gets a new session that closes the same
 * way; a `Session` object kept from before rejects with a {@link SessionClosedError}
 * whose `reason` says why.
 *
 * @returns `body`'s result; rejects without running `body` when the registry is
 *   draining ({@link RegistryClosedError}), has no data source, or fails to initialize
 * @internal
 */
export async function requestScope<T>(
  registry: SessionRegistry,
  body: (end: (reason: RequestEnd) => void) => T | Promise<T>,
): Promise<T> {
  const test = registry._testScope;
  // Under useTransactionalTests() a request's scope is the test's: same session, same transaction.
  if (test !== undefined) return storage.run({ scope: test, parent: storage.getStore() }, () => body(() => {}));
  await readyHost(registry);
  const scope: Scope = { registry, session: undefined, ended: false };
  const end = (reason: RequestEnd): void => {
    if (scope.over !== undefined) return;
    scope.over = reason;
    scope.ended = true;
    scope.session?._closeWhenIdle(reason, false);
  };
  return storage.run({ scope, parent: storage.getStore() }, () => body(end));
}

/**
 * Run a scope's body, then remove its session, whatever the body did, before
 * settling; run the callbacks its transaction left in the caller's context. The
 * block settles early when its session is force-closed (`timeoutMs`, `drain()`).
 */
async function settle<T>(
  scope: Scope,
  host: RegistryHost,
  pending: SessionCallback[],
  timeoutMs: number | undefined,
  body: () => T | Promise<T>,
): Promise<T> {
  const session = scope.session;
  const timer = session === undefined ? undefined : timeout(session, host, timeoutMs);
  let value: T;
  try {
    value = session === undefined ? await body() : await session._guard(body());
  } catch (error) {
    clearTimeout(timer);
    const finishing = finish(scope, pending);
    if (finishing !== undefined) await finishing;
    throw error;
  }
  clearTimeout(timer);
  const finishing = finish(scope, pending);
  if (finishing !== undefined) await finishing;
  return value;
}

/** Remove the scope's session and run the callbacks left to run; `undefined` when that took nothing to wait for. */
function finish(scope: Scope, pending: SessionCallback[]): Promise<void> | undefined {
  scope.ended = true;
  const session = scope.session;
  if (session === undefined || (pending.length === 0 && session._closeIdle())) return undefined;
  return (async () => {
    pending.push(...(await session._close()));
    await session._runCallbacks(pending);
  })();
}

/**
 * With `timeoutMs`: when it expires, force-close the session the block uses (the
 * running statement cancelled, the transaction rolled back, the connection
 * released, the signal aborted); the block rejects with {@link SessionTimeoutError}
 * and the abandoned body's later calls fail with {@link SessionClosedError}.
 */
function timeout(session: Session, host: RegistryHost, timeoutMs: number | undefined): NodeJS.Timeout | undefined {
  if (timeoutMs === undefined) return undefined;
  const started = performance.now();
  return setTimeout(() => {
    host.timedOut(session, performance.now() - started);
    const waiting = session._waitingForConnection() ? "while waiting for a connection (all are in use)" : undefined;
    void session._kill(new SessionTimeoutError(String(session), timeoutMs, waiting));
  }, timeoutMs);
}

/**
 * `retry` whose `retryOn` is asked once per failed attempt: the rollback (which drops the
 * attempt's callbacks) and the retry loop ask about the same error, and a user's `retryOn`
 * that counts or logs must see it once.
 */
function decidedOnce(retry: ResolvedRetry): ResolvedRetry {
  let last: { error: unknown; verdict: boolean } | undefined;
  return {
    ...retry,
    retryOn: (error) => {
      if (last === undefined || last.error !== error) last = { error, verdict: retry.retryOn(error) };
      return last.verdict;
    },
    // The same error object thrown again by a later attempt is asked about again.
    attemptBegins: () => (last = undefined),
  };
}

/** Re-run `attempt` on retryable errors with capped exponential backoff and jitter. */
async function retrying<T>(retry: ResolvedRetry, attempt: (n: number) => Promise<T>): Promise<T> {
  for (let n = 1; ; n++) {
    retry.attemptBegins?.();
    try {
      return await attempt(n);
    } catch (error) {
      if (n > retry.retries || !retry.retryOn(error)) throw error;
    }
    const delay = Math.min(retry.maxDelayMs, retry.baseDelayMs * 2 ** (n - 1)) * (0.5 + Math.random() / 2);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

/**
 * Run a block on a given session: directly when it is not transactional (and has
 * no timeout), else in a frame of its own that owns the transaction level it
 * opens. Also the path of TypeORM's `manager.transaction()` on a session's manager.
 *
 * @internal
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
  if (!opts.transaction && opts.timeoutMs === undefined) return fn(session);
  const frame: Frame = { scope, parent: here };
  const retry = opts.retry === undefined || session.inTransaction ? undefined : decidedOnce(opts.retry);
  const run = async (attempt: number | undefined): Promise<T> => {
    const pending: SessionCallback[] = [];
    const timer = host === undefined ? undefined : timeout(session, host, opts.timeoutMs);
    try {
      return await session._guard(
        storage.run(frame, () =>
          opts.transaction
            ? transactional(
                session,
                frame,
                fn,
                retry === undefined ? opts : { ...opts, retry },
                false,
                pending,
                attempt,
              )
            : fn(session),
        ),
      );
    } finally {
      clearTimeout(timer);
      await session._runCallbacks(pending);
    }
  };
  // A joined block retries only as the outermost transaction of a session still usable.
  if (retry === undefined) return run(undefined);
  return retrying({ ...retry, retryOn: (error) => !session.closed && retry.retryOn(error) }, run);
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
    value = await fn(session);
    await session._beforeCommit(handle);
  } catch (error) {
    session._markRollbackOnly(handle, opts.name);
    if (owner) session._markClosing();
    const outcome = await session._exit(handle, false);
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

/**
 * On a single-connection driver, a second session would wait for the connection
 * that an enclosing transaction holds until that transaction ends: forever.
 */
function assertSecondSessionAllowed(
  here: Frame | undefined,
  host: RegistryHost,
  name: string | undefined,
  how: string,
): void {
  const lease = host.lease;
  if (lease === undefined) return;
  const holders = [...lineage(here)].map((f) => f.scope.session);
  // Under useTransactionalTests() the test's transaction holds the connection throughout.
  if (lease.holder?._test === true) holders.push(lease.holder);
  for (const session of holders) {
    if (session !== undefined && session._holdsTransactionOn(lease)) {
      throw new PropagationError(
        `Block${name === undefined ? "" : ` "${name}"`} asks for a new session (${how}) ` +
          `inside an open transaction of ${String(session)}, but this ${host.family} database has a single ` +
          `connection, which that transaction holds until it ends: the block would wait forever. Use ` +
          `propagation "required" (a savepoint), or start the work from session.afterCommit().`,
      );
    }
  }
}
