/**
 * Koa (2 and 3) middleware: one session scope per request.
 *
 * @module typeorm-scoped-session/koa
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { SessionRegistry } from "../core/registry.js";
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
 * database takes no connection. The scope is removed when downstream settles,
 * before Koa writes the response, or when the client goes away first: a
 * transaction left open is rolled back, the connection released,
 * `session.signal` aborted. So a response body must not read from the database
 * lazily (a stream of query results); load it downstream. When the client went
 * away first, the middleware still waits for downstream to settle, and what
 * downstream then does with the session fails with `SessionClosedError`.
 *
 * A downstream error is rethrown unchanged, after the rollback, to upstream
 * middleware and Koa's error handling (`ctx.onerror`, the app's `error` event).
 *
 * @param options - `registry` (default: `defaultRegistry`)
 * @returns the middleware, to pass to `app.use()`
 * @throws TypeError when `options` is not an object or `registry` not a {@link SessionRegistry}
 * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError} (as a rejection, for each request) while the registry has no data
 *   source; an error initializing the DataSource on the first request rejects the same way
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
  return async function koaSession(ctx, next) {
    let downstream: Promise<unknown> | undefined;
    await registry.scope(
      () =>
        new Promise<void>((resolve, reject) => {
          const stop = onResponseEnd(ctx.req, ctx.res, resolve);
          downstream = next();
          downstream.then(
            () => {
              stop();
              resolve();
            },
            (error: unknown) => {
              stop();
              reject(error);
            },
          );
        }),
    );
    // The scope ended with downstream, or because the client went away first: then downstream
    // is still running; wait for it as Koa would have, so that its outcome reaches Koa.
    await downstream;
  };
}
