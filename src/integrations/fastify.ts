/**
 * Fastify (5) plugin: one session scope per request.
 *
 * @module typeorm-scoped-session/fastify
 */
import type { FastifyInstance, FastifyPluginAsync } from "fastify";
import type { SessionRegistry } from "../core/registry/registry.js";
import { registryOption } from "./http.js";
import { enterRequestScope } from "./http.js";

/**
 * Options of {@link fastifySession}.
 *
 * @example
 * ```ts
 * await app.register(fastifySession, { registry: db } satisfies FastifySessionOptions);
 * ```
 */
export interface FastifySessionOptions {
  /**
   * The registry whose scope each request runs in.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
}

/**
 * Fastify plugin: one session scope per request, for every route of the app.
 * The route's handler and the hooks after `onRequest` (`preParsing` through
 * `onSend`), however deep, get the request's session from
 * `currentSession(registry)`, `registry.current()` or the registry's
 * `manager`/`getRepository` proxies, and blocks (`withSession`,
 * `withTransaction`, decorated methods) join it.
 *
 * The plugin is not encapsulated (like a plugin wrapped in `fastify-plugin`):
 * registered on the root instance, it covers the routes of every plugin
 * registered after it. Register it before the routes.
 *
 * The session is created on first use: a request that never touches the
 * database takes no connection. Once the response has finished or the client
 * has gone away, the session closes as soon as nothing of it runs: a block
 * still running ends as its body says (commits or rolls back) first; then the
 * connection is released and `session.signal` aborted. Work the handler does
 * after that (after sending the reply, say) runs in a new session that closes
 * the same way; a `Session` object kept from before gets `SessionClosedError`.
 *
 * Errors of the routes and hooks are left to Fastify: they reach the app's
 * error handler (`setErrorHandler`) unchanged, inside the request's scope, and
 * its `statusCode` counts as usual.
 *
 * @param fastify - the Fastify instance (the root one, so that every route is covered)
 * @param options - `registry` (default: `defaultRegistry`)
 * @throws TypeError (as a rejection of `register`, so of `app.ready()`/`listen()`) when
 *   `options` is not an object or `registry` not a {@link typeorm-scoped-session!SessionRegistry}
 * @throws {@link typeorm-scoped-session!RegistryClosedError} (to Fastify's error handling, for each request) while the registry
 *   drains; {@link typeorm-scoped-session!RegistryNotConfiguredError} and an error initializing the DataSource the same way
 * @example
 * ```ts
 * import Fastify from "fastify";
 * import { createSessionRegistry } from "typeorm-scoped-session";
 * import { fastifySession } from "typeorm-scoped-session/fastify";
 *
 * const db = createSessionRegistry({ url: "postgres://app@localhost/app", entities: [User] });
 * const users = db.getRepository(User); // resolves to the request's session, call by call
 *
 * const app = Fastify();
 * await app.register(fastifySession, { registry: db });
 * app.get<{ Params: { id: string } }>("/users/:id", (req) => users.findOneBy({ id: Number(req.params.id) }));
 * app.post("/users", (req) => db.withTransaction((s) => s.getRepository(User).save(req.body as User)));
 * await app.listen({ port: 3000 });
 * ```
 */
export const fastifySession: FastifyPluginAsync<FastifySessionOptions> = async function fastifySession(
  fastify: FastifyInstance,
  options: FastifySessionOptions,
): Promise<void> {
  const registry = registryOption(options, "fastifySession");
  // The rest of the request runs from `done`, so inside the scope; Fastify carries the
  // context across body parsing (its parsers run in an AsyncResource of the request).
  fastify.addHook("onRequest", (request, reply, done) => {
    enterRequestScope(registry, request.raw, reply.raw, (error) => done(error as Error | undefined));
  });
};

// What `fastify-plugin` sets: no encapsulation, and a name in Fastify's errors and logs.
Object.assign(fastifySession, {
  [Symbol.for("skip-override")]: true,
  [Symbol.for("fastify.display-name")]: "typeorm-scoped-session",
  [Symbol.for("plugin-meta")]: { name: "typeorm-scoped-session", fastify: "5.x" },
});
