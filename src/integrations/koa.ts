/**
 * Koa (2 and 3) middleware: one session scope per request.
 *
 * @module typeorm-scoped-session/koa
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { SessionRegistry } from "../core/registry/registry.js";
import { requestScope } from "../core/block/open.js";
import { onResponseEnd, registryOption } from "./http.js";

/** Options of {@link koaSession}. */
export interface KoaSessionOptions {
  /**
   * The registry whose scope each request runs in.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
}

/** The part of a Koa context that {@link koaSession} uses. */
export interface KoaSessionContext {
  /** Node's request (`ctx.req`). */
  readonly req: IncomingMessage;
  /** Node's response (`ctx.res`). */
  readonly res: ServerResponse;
}

/**
 * The middleware {@link koaSession} returns: a Koa (2 or 3) middleware, typed
 * structurally so that it fits any version of `@types/koa`.
 */
export type KoaSessionMiddleware = (ctx: KoaSessionContext, next: () => Promise<unknown>) => Promise<void>;

/**
 * Koa middleware: one session scope per request, around everything downstream.
 * Downstream middleware, however deep, gets the request's session from
 * `currentSession(registry)`, `registry.current()` or the registry's
 * `manager`/`getRepository` proxies, and blocks (`withSession`,
 * `withTransaction`, decorated methods) join it.
 *
 * The session is created on first use: a request that never touches the
 * database takes no connection; outside a transaction it holds a pooled
 * connection only while a statement runs.
 *
 * The request is over when downstream settles (before Koa writes the response)
 * or when the client goes away first. That does not cut work off: the session
 * is removed as soon as nothing of it runs any more, so a block still running
 * then ends as its body says (commits or rolls back) and the session is removed
 * after it. What downstream still does after the client left, through the
 * proxies, `currentSession()` or a new block, runs on a new session that is
 * removed the same way once that work is done; only a `Session` object kept from
 * before rejects, with a `SessionClosedError` whose `reason` is
 * `"client-disconnected"` (or `"response-finished"`, for work that outlives
 * downstream). A response body must not read from the database lazily (a stream
 * of query results): load it downstream.
 *
 * A downstream error is rethrown unchanged, after the failing block's rollback,
 * to upstream middleware and Koa's error handling (`ctx.onerror`, the app's
 * `error` event).
 *
 * @param options - `registry` (default: `defaultRegistry`)
 * @returns the middleware, to pass to `app.use()`
 * @throws TypeError when `options` is not an object or `registry` not a {@link SessionRegistry}
 * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError} (as a rejection, for each request) while the registry
 *   has no data source; {@link typeorm-scoped-session!RegistryClosedError} the same way once the registry drains; an
 *   error initializing the DataSource on the first request rejects the same way. Downstream does not run then.
 * @example
 * ```ts
 * import Koa from "koa";
 * import { createSessionRegistry } from "typeorm-scoped-session";
 * import { koaSession } from "typeorm-scoped-session/koa";
 *
 * const db = createSessionRegistry({ url: "postgres://app@localhost/app", entities: [User] });
 * const users = db.getRepository(User); // resolves to the request's session, call by call
 *
 * const app = new Koa();
 * app.use(koaSession({ registry: db }));
 * app.use(async (ctx) => {
 *   ctx.body = await users.find();
 * });
 * ```
 */
export function koaSession(options: KoaSessionOptions = {}): KoaSessionMiddleware {
  const registry = registryOption(options, "koaSession");
  return function koaSession(ctx, next) {
    return requestScope(registry, async (end) => {
      const stop = onResponseEnd(ctx.req, ctx.res, end);
      try {
        await next();
      } finally {
        stop();
        end("response-finished");
      }
    });
  };
}
