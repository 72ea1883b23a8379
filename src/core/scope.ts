import { AsyncLocalStorage } from "node:async_hooks";
import type { Session } from "./session/session.js";
import type { SessionRegistry } from "./registry/registry.js";

/**
 * The unit of scoping: what `registry.current()` returns for one web request,
 * cron tick or job. Its session is created on first use and removed when the
 * block that opened the scope settles.
 */
export interface Scope {
  readonly registry: SessionRegistry;
  session: Session | undefined;
  /** Set once the block that opened the scope has settled, or a request scope's request is over. */
  ended: boolean;
  /**
   * Only on the scope of a web request (`requestScope()` of block/open.ts): why the request is over,
   * once it is. From then on the scope's session closes whenever nothing of it runs, and
   * the next use of the scope gets a new session that does the same.
   */
  over?: RequestEnd | undefined;
  /**
   * A scope begun before the registry began to drain (`registry.scope()`, a web request): work
   * it had accepted may still open its session during the drain, which waits for the scope.
   */
  accepted?: boolean;
  /** With `replicas`: the scope has written on the primary, so its read-only blocks stay there. */
  wrote?: boolean;
}

/** Why a request scope's request is over: the response finished, or the client went away first. */
export type RequestEnd = "response-finished" | "client-disconnected";

/**
 * What the AsyncLocalStorage holds: one frame per block that needs its own
 * context (a new scope, or a transaction level it owns). Frames chain to the
 * frame they were opened in, so several registries nest in one context and an
 * owner can recognise work that runs inside its own block.
 */
export interface Frame {
  readonly scope: Scope;
  readonly parent: Frame | undefined;
  /** For a detached scope, which inherits nothing: where it was started from. */
  readonly origin?: Frame | undefined;
}

/**
 * One storage for every registry of this module instance: enabling more than one
 * AsyncLocalStorage slows every async operation in the process on Node 20.
 */
export const storage = new AsyncLocalStorage<Frame>();

/** The innermost scope of `registry` in the chain starting at `frame`. */
export function findScope(frame: Frame | undefined, registry: SessionRegistry): Scope | undefined {
  for (let f = frame; f !== undefined; f = f.parent) {
    if (f.scope.registry === registry) return f.scope;
  }
  // Under useTransactionalTests(), code outside every block runs in the test's scope.
  return registry._testScope;
}

/** Mark every scope of `registry` that `frame` runs in as having written on the primary. */
export function markWrote(frame: Frame | undefined, registry: SessionRegistry): void {
  for (let f = frame; f !== undefined; f = f.parent) {
    if (f.scope.registry === registry) f.scope.wrote = true;
  }
}

/** Whether a scope of `registry` that `frame` runs in has written on the primary. */
export function wrote(frame: Frame | undefined, registry: SessionRegistry): boolean {
  for (let f = frame; f !== undefined; f = f.parent) {
    if (f.scope.registry === registry && f.scope.wrote === true) return true;
  }
  return false;
}

/** Whether `frame` is `ancestor` or runs inside it. */
export function isWithin(frame: Frame | undefined, ancestor: Frame): boolean {
  for (let f = frame; f !== undefined; f = f.parent) {
    if (f === ancestor) return true;
  }
  return false;
}

/**
 * The scope that gives `session` in the chain starting at `frame`, or a scope of
 * its own for a session used outside the blocks that opened it, so that work
 * started through it sees it as current.
 */
export function scopeOf(frame: Frame | undefined, session: Session): Scope {
  for (let f = frame; f !== undefined; f = f.parent) {
    if (f.scope.session === session) return f.scope;
  }
  return { registry: session.registry, session, ended: false };
}

/**
 * Every frame that leads to `frame`, through detached scopes to the code that
 * started them: who could be waiting for work that runs in `frame`.
 */
export function* lineage(frame: Frame | undefined): Generator<Frame> {
  for (let f = frame; f !== undefined; f = f.parent ?? f.origin) yield f;
}
