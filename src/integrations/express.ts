/**
 * Express (4 and 5) middleware: one session scope per request.
 *
 * @module typeorm-scoped-session/express
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { SessionRegistry } from "../core/registry/registry.js";
import { enterRequestScope, registryOption } from "./http.js";

/** Options of {@link sessionMiddleware}. */
export interface SessionMiddlewareOptions {
  /**
   * The registry whose scope each request runs in.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
}

/**
 * The middleware {@link sessionMiddleware} returns: an Express (4 or 5) request
 * handler, typed with Node's own request and response so that it fits any
 * version of `@types/express`.
 */
export type SessionMiddleware = (req: IncomingMessage, res: ServerResponse, next: (error?: unknown) => void) => void;

/**
 * Express middleware: one session scope per request. Everything the request's
 * handlers run, however deep, gets the request's session from
 * `currentSession(registry)`, `registry.current()` or the registry's
 * `manager`/`getRepository` proxies, and blocks (`withSession`,
 * `withTransaction`, decorated methods) join it.
 *
 * The session is created on first use: a request that never touches the
 * database takes no connection; outside a transaction it holds a pooled
 * connection only while a statement runs.
 *
 * The request is over when the response has finished or the client has gone
 * away, whichever comes first. That does not cut the handler's work off: the
 * session is removed as soon as nothing of it runs any more, so a block still
 * running then (`withTransaction` that responded before its last statement) ends
 * as its body says, committing or rolling back, and the session is removed after
 * it. What the handler does after that through the proxies, `currentSession()`
 * or a new block runs on a new session, which is removed the same way as soon as
 * that work is done: a handler that goes on after the client left does not fail
 * and leaks nothing. Only a `Session` object kept from before rejects, with a
 * `SessionClosedError` whose `reason` is `"client-disconnected"` or
 * `"response-finished"`: get the session anew for each use. Start work that must
 * outlive the request on purpose with `registry.detached()`.
 *
 * Errors of the handlers (thrown, or rejected by Express 5 async handlers) are
 * left to Express: they reach its error middleware unchanged, still inside the
 * request's scope.
 *
 * @param options - `registry` (default: `defaultRegistry`)
 * @returns the middleware, to pass to `app.use()` (or to a router or a route)
 * @throws TypeError when `options` is not an object or `registry` not a {@link SessionRegistry}
 * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError} (passed to `next`) for each request while the registry
 *   has no data source; {@link typeorm-scoped-session!RegistryClosedError} the same way once the registry drains; an
 *   error initializing the DataSource on the first request is passed to `next` the same way. No handler runs then.
 * @example
 * ```ts
 * import express from "express";
 * import { createSessionRegistry } from "typeorm-scoped-session";
 * import { sessionMiddleware } from "typeorm-scoped-session/express";
 *
 * const db = createSessionRegistry({ url: "postgres://app@localhost/app", entities: [User, AuditEntry] });
 * const users = db.getRepository(User); // resolves to the request's session, call by call
 *
 * const app = express();
 * app.use(sessionMiddleware({ registry: db }));
 * app.get("/users/:id", async (req, res) => {
 *   res.json(await users.findOneBy({ id: Number(req.params.id) }));
 * });
 * app.post("/users", async (req, res) => {
 *   await db.withTransaction(async (s) => {
 *     const user = await s.getRepository(User).save(req.body);
 *     res.status(201).json(user); // the transaction still commits after the response
 *     await s.getRepository(AuditEntry).insert({ action: "user created", userId: user.id });
 *   });
 * });
 * ```
 */
export function sessionMiddleware(options: SessionMiddlewareOptions = {}): SessionMiddleware {
  const registry = registryOption(options, "sessionMiddleware");
  return function sessionMiddleware(req, res, next) {
    enterRequestScope(registry, req, res, next);
  };
}
