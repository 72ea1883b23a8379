import { NoActiveSessionError, PropagationError, SessionClosedError } from "../errors.js";
import { describe, resolveOptions, type ResolvedOptions } from "./options.js";
import type { SessionRegistry } from "./registry.js";
import { findScope, type Frame, type Scope, storage } from "./scope.js";
import type { Session, SessionCallback, SessionHost } from "./session.js";

/** The body of a block: receives the session, returns a value or a promise of one. */
export type SessionBody<T> = (session: Session) => T | Promise<T>;

type Host = SessionHost & { createSession(name: string | undefined): Session };

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
): Promise<T> {
  try {
    if (typeof fn !== "function") throw new TypeError(`Expected the block body to be a function, got ${describe(fn)}`);
    return execute(bound, fn, resolveOptions(options, fn.name === "" ? undefined : fn.name, transactional));
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
export async function execute<T>(bound: SessionRegistry, fn: SessionBody<T>, opts: ResolvedOptions): Promise<T> {
  const registry = opts.registry ?? bound;
  let host = registry._ready();
  if (host instanceof Promise) host = await host;
  const here = storage.getStore();
  const scope = findScope(here, registry);
  if (scope !== undefined && opts.propagation !== "requiresNew") {
    return join(scope, host as Host, here, fn, opts);
  }
  if (opts.propagation === "mandatory") {
    throw new NoActiveSessionError(
      registry.name,
      `A block with propagation "mandatory"${opts.name === undefined ? "" : ` (${opts.name})`}`,
    );
  }
  if (opts.propagation === "requiresNew") assertSecondSessionAllowed(here, host, opts);
  return open(registry, host as Host, here, fn, opts);
}

/** `registry.scope(fn)`: a new scope whose session is created on first use. @internal */
export async function openScope<T>(registry: SessionRegistry, fn: () => T | Promise<T>): Promise<T> {
  if (typeof fn !== "function") throw new TypeError(`Expected the scope body to be a function, got ${describe(fn)}`);
  const host = registry._ready();
  if (host instanceof Promise) await host;
  const scope: Scope = { registry, session: undefined, ended: false };
  return settle(scope, [], () => storage.run({ scope, parent: storage.getStore() }, fn));
}

/** Open a new scope with its own session, run the body in it, then close it. */
function open<T>(
  registry: SessionRegistry,
  host: Host,
  here: Frame | undefined,
  fn: SessionBody<T>,
  opts: ResolvedOptions,
): Promise<T> {
  const session = host.createSession(opts.name);
  const scope: Scope = { registry, session, ended: false };
  const frame: Frame = { scope, parent: here };
  const pending: SessionCallback[] = [];
  return settle(scope, pending, () =>
    storage.run(frame, () => (opts.transaction ? transactional(session, frame, fn, opts, true, pending) : fn(session))),
  );
}

/**
 * Run a scope's body, then remove its session (whatever the body did) before
 * settling, and run the callbacks left by its transaction in the caller's context.
 */
async function settle<T>(scope: Scope, pending: SessionCallback[], body: () => T | Promise<T>): Promise<T> {
  let value: T;
  try {
    value = await body();
  } catch (error) {
    await finish(scope, pending);
    throw error;
  }
  await finish(scope, pending);
  return value;
}

async function finish(scope: Scope, pending: SessionCallback[]): Promise<void> {
  scope.ended = true;
  const session = scope.session;
  if (session === undefined) return;
  pending.push(...(await session._close()));
  await session._runCallbacks(pending);
}

/** Join the scope's session (creating it in a lazy scope). */
async function join<T>(
  scope: Scope,
  host: Host,
  here: Frame | undefined,
  fn: SessionBody<T>,
  opts: ResolvedOptions,
): Promise<T> {
  if (scope.ended && scope.session === undefined) {
    throw new SessionClosedError(`The session of registry "${scope.registry.name}"`, "its scope has ended");
  }
  return joinSession((scope.session ??= host.createSession(opts.name)), scope, here, fn, opts);
}

/**
 * Run a block on a given session: directly when it is not transactional, else in
 * a frame of its own that owns the transaction level it opens. Also the path of
 * TypeORM's `manager.transaction()` on a session's manager.
 *
 * @internal
 */
export async function joinSession<T>(
  session: Session,
  scope: Scope,
  here: Frame | undefined,
  fn: SessionBody<T>,
  opts: ResolvedOptions,
): Promise<T> {
  if (!session._usableFrom(here)) throw session._closedError();
  if (!opts.transaction) return fn(session);
  const frame: Frame = { scope, parent: here };
  const pending: SessionCallback[] = [];
  try {
    return await storage.run(frame, () => transactional(session, frame, fn, opts, false, pending));
  } finally {
    await session._runCallbacks(pending);
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
): Promise<T> {
  const handle = await session._enter(frame, opts);
  let value: T;
  try {
    value = await fn(session);
  } catch (error) {
    session._markRollbackOnly(handle, opts.name);
    if (owner) session._markClosing();
    pending.push(...(await session._exit(handle, false)).callbacks);
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
function assertSecondSessionAllowed(here: Frame | undefined, host: SessionHost, opts: ResolvedOptions): void {
  const lease = host.lease;
  if (lease === undefined) return;
  for (let f = here; f !== undefined; f = f.parent) {
    const session = f.scope.session;
    if (session !== undefined && session._holdsTransactionOn(lease)) {
      throw new PropagationError(
        `Block${opts.name === undefined ? "" : ` "${opts.name}"`} asks for a new session (propagation "requiresNew") ` +
          `inside an open transaction of ${String(session)}, but this ${host.family} database has a single ` +
          `connection, which that transaction holds until it ends: the block would wait forever. Use ` +
          `propagation "required" (a savepoint), or start the work from session.afterCommit().`,
      );
    }
  }
}
