/**
 * A small Koa 3 app on typeorm-scoped-session: one session per request, created on first use,
 * removed once downstream has settled (or the client has gone away) and nothing of it runs.
 *
 *   npm run build && npx tsc -p tsconfig.json && node build/examples/koa-app.js
 *
 * runs it on embedded SQLite (in memory) and prints its URL; try
 *   curl -X POST -H 'content-type: application/json' -d '{"title":"milk"}' http://127.0.0.1:PORT/todos
 *   curl http://127.0.0.1:PORT/todos
 */
import "reflect-metadata";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { pathToFileURL } from "node:url";
import Koa from "koa";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";
import { createSessionRegistry, type SessionRegistry } from "typeorm-scoped-session";
import { koaSession } from "typeorm-scoped-session/koa";

@Entity("todos")
export class Todo {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  title!: string;
}

/** A registry on `url` (default: a fresh in-memory SQLite database) with the app's entities. */
export function createRegistry(url = "sqlite::memory:"): SessionRegistry {
  return createSessionRegistry({ name: "koa-app", url, entities: [Todo], synchronize: true });
}

/** The request body parsed as JSON (Koa has no body parser of its own). */
async function readJson(req: IncomingMessage): Promise<unknown> {
  let text = "";
  for await (const chunk of req) text += String(chunk);
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
}

/** The app: everything after `koaSession` runs in the request's session scope of `registry`. */
export function createApp(registry: SessionRegistry): Koa {
  // Safe to create once: each call resolves to the session of the request that makes it.
  const todos = registry.getRepository(Todo);

  const app = new Koa();
  // Outermost: errors arrive here after the request's session has been rolled back and released.
  app.use(async (ctx, next) => {
    try {
      await next();
    } catch (error) {
      ctx.status = 500;
      ctx.body = { error: error instanceof Error ? error.message : String(error) };
      ctx.app.emit("error", error, ctx);
    }
  });
  app.use(koaSession({ registry }));

  app.use(async (ctx) => {
    if (ctx.method === "GET" && ctx.path === "/health") {
      // Never touches the database, so it takes no connection.
      ctx.body = { ok: true };
    } else if (ctx.method === "GET" && ctx.path === "/todos") {
      ctx.body = await todos.find({ order: { id: "ASC" } });
    } else if (ctx.method === "POST" && ctx.path === "/todos") {
      const { title } = ((await readJson(ctx.req)) ?? {}) as { title?: unknown };
      if (typeof title !== "string" || title === "") {
        ctx.status = 400;
        ctx.body = { error: "expected a JSON body with a title" };
        return;
      }
      // A transaction that joins the request's session: committed before the response is sent.
      ctx.body = await registry.withTransaction((s) => s.getRepository(Todo).save({ title }));
      ctx.status = 201;
    }
  });
  return app;
}

/** Start the app on 127.0.0.1:`port` (0: any free port); resolves once it listens. */
export async function start(registry: SessionRegistry, port = 0): Promise<{ server: Server; url: string }> {
  const handle = createApp(registry).callback();
  // Koa's handler settles its own errors: its promise never rejects.
  const server = createServer((req, res) => void handle(req, res));
  await new Promise<void>((resolve) => server.listen(port, "127.0.0.1", resolve));
  const { port: actual } = server.address() as AddressInfo;
  return { server, url: `http://127.0.0.1:${actual}` };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const registry = createRegistry(process.env.DATABASE_URL);
  const { server, url } = await start(registry, Number(process.env.PORT ?? 0));
  console.log(`koa-app listening on ${url}`);
  process.once("SIGTERM", () => {
    // Stop taking requests, let the open ones finish (10 s at most), then close the database.
    server.close();
    void registry.drain({ timeoutMs: 10_000, destroy: true }).then(({ forced }) => {
      console.log(`koa-app stopped (${forced} sessions forced closed)`);
      process.exitCode = forced === 0 ? 0 : 1;
    });
  });
}
