import { PropagationError, SessionTimeoutError } from "../../errors.js";
import { describe } from "../describe.js";
import type { RegistryHost } from "../registry/host.js";
import { resolveOpenOptions } from "./option-checks.js";
import type { SessionRegistry } from "../registry/registry.js";
import { type Frame, lineage, type RequestEnd, type Scope, storage } from "../scope.js";
import type { Session, SessionCallback } from "../session/session.js";

/*
 * Opening a session, and what goes with it: the check before (a second session must not
 * wait forever for the one connection), the deadline while it runs (`timeoutMs`), and its
 * removal after. Also the ways to open a session or a scope without a block: `open()`,
 * `registry.scope()` and the scope of a web request. The blocks themselves are in block.ts.
 */

/** The ready host of `registry`, refusing new work once it drains. */
async function readyHost(registry: SessionRegistry): Promise<RegistryHost> {
  const ready = registry._ready();
  const host = (ready instanceof Promise ? await ready : ready) as RegistryHost;
  host.assertOpen();
  return host;
}

/**
 * `registry.scope(fn)`: a new scope whose session is created on first use.
 *
 * @internal
 * @example
 * ```ts
 * await openScope(registry, () => Promise.all([loadUser(), loadOrders()])); // one session for both
 * ```
 */
export async function openScope<T>(registry: SessionRegistry, fn: () => T | Promise<T>): Promise<T> {
  if (typeof fn !== "function") throw new TypeError(`Expected the scope body to be a function, got ${describe(fn)}`);
  const test = registry._testScope;
  // Under useTransactionalTests() a request's scope is the test's: same session, same transaction.
  if (test !== undefined) return storage.run({ scope: test, parent: storage.getStore() }, fn);
  await readyHost(registry);
  // drain() waits for the scope: its body may open its session during the drain.
  const release = registry._hold();
  const scope: Scope = { registry, session: undefined, ended: false, accepted: release !== undefined };
  try {
    return await storage.run({ scope, parent: storage.getStore() }, fn);
  } finally {
    // The session, if the body made one, is removed whatever the body did, before the scope settles.
    const finishing = finish(scope, undefined);
    if (finishing !== undefined) await finishing;
    release?.();
  }
}

/**
 * `registry.open()` / `openSession()`: a new session that the caller owns and closes
 * (`close()`, `await using`). Bound to no scope; with `transaction` it begins at once,
 * and what is left uncommitted is rolled back when it closes.
 *
 * @internal
 * @example
 * ```ts
 * await using session = await openExplicit(defaultRegistry, { transaction: true });
 * ```
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
      session._trace?.fail(error);
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
 * @example
 * ```ts
 * return requestScope(registry, (end) => {
 *   res.once("finish", () => end("response-finished"));
 *   return next();
 * });
 * ```
 */
export async function requestScope<T>(
  registry: SessionRegistry,
  body: (end: (reason: RequestEnd) => void) => T | Promise<T>,
): Promise<T> {
  const test = registry._testScope;
  // Under useTransactionalTests() a request's scope is the test's: same session, same transaction.
  if (test !== undefined) return storage.run({ scope: test, parent: storage.getStore() }, () => body(() => {}));
  await readyHost(registry);
  // A request accepted before drain() began is work in flight: drain() waits until it is over, and
  // until then it may open its session (server.close() stops new requests; these still finish).
  const release = registry._hold();
  const scope: Scope = { registry, session: undefined, ended: false, accepted: release !== undefined };
  const end = (reason: RequestEnd): void => {
    if (scope.over !== undefined) return;
    scope.over = reason;
    scope.ended = true;
    scope.session?._closeWhenIdle(reason, false);
    // Its session, if still busy, keeps drain() waiting as an open session from here on.
    release?.();
  };
  return storage.run({ scope, parent: storage.getStore() }, () => body(end));
}

/**
 * The scope's body has settled: remove its session, then run the callbacks left to run
 * (`pending`: those its transaction left in the caller's context, then those of what
 * closing rolled back). `undefined` when that took nothing to wait for: the session
 * never touched the database, the common case, closed without a promise.
 *
 * @internal
 * @example
 * ```ts
 * const finishing = finish(scope, pending);
 * if (finishing !== undefined) await finishing;
 * ```
 */
export function finish(scope: Scope, pending: SessionCallback[] | undefined): Promise<void> | undefined {
  scope.ended = true;
  const session = scope.session;
  if (session === undefined || ((pending === undefined || pending.length === 0) && session._closeIdle())) {
    return undefined;
  }
  return closeAndRunCallbacks(session, pending ?? []);
}

async function closeAndRunCallbacks(session: Session, pending: SessionCallback[]): Promise<void> {
  pending.push(...(await session._close()));
  await session._runCallbacks(pending);
}

/**
 * With `timeoutMs`: when it expires, force-close the session the block uses (the
 * running statement cancelled, the transaction rolled back, the connection
 * released, the signal aborted); the block rejects with {@link SessionTimeoutError}
 * and the abandoned body's later calls fail with {@link SessionClosedError}.
 *
 * @internal
 * @example
 * ```ts
 * const timer = timeout(session, host, opts.timeoutMs);
 * try { return await work; } finally { clearTimeout(timer); }
 * ```
 */
export function timeout(
  session: Session,
  host: RegistryHost,
  timeoutMs: number | undefined,
): NodeJS.Timeout | undefined {
  if (timeoutMs === undefined) return undefined;
  const started = performance.now();
  return setTimeout(() => {
    host.timedOut(session, performance.now() - started);
    const waiting = session._waitingForConnection() ? "while waiting for a connection (all are in use)" : undefined;
    void session._kill(new SessionTimeoutError(String(session), timeoutMs, waiting));
  }, timeoutMs);
}

/**
 * On a single-connection driver, a second session would wait for the connection
 * that an enclosing transaction holds until that transaction ends: forever.
 *
 * @internal
 * @example
 * ```ts
 * assertSecondSessionAllowed(storage.getStore(), host, opts.name, "detached()"); // throws PropagationError
 * ```
 */
export function assertSecondSessionAllowed(
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
