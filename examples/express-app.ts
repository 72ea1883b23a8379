/**
 * A small Express 5 app on typeorm-scoped-session: one session per request, created on first
 * use and removed once the request is over (response finished or client gone) and nothing of it
 * runs: a transaction still running then commits or rolls back as its body says first.
 *
 *   npm run build && npx tsc -p tsconfig.json && node build/examples/express-app.js
 *
 * runs it on embedded SQLite (in memory) and prints its URL; try
 *   curl -X POST -H 'content-type: application/json' -d '{"title":"milk"}' http://127.0.0.1:PORT/todos
 *   curl http://127.0.0.1:PORT/todos
 */
import "reflect-metadata";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { pathToFileURL } from "node:url";
import express, { type ErrorRequestHandler, type Express } from "express";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";
import { createSessionRegistry, currentSession, type SessionRegistry } from "typeorm-scoped-session";
import { sessionMiddleware } from "typeorm-scoped-session/express";

@Entity("todos")
export class Todo {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  title!: string;

  @Column("boolean", { default: false })
  done!: boolean;
}

/** A registry on `url` (default: a fresh in-memory SQLite database) with the app's entities. */
export function createRegistry(url = "sqlite::memory:"): SessionRegistry {
  return createSessionRegistry({ name: "express-app", url, entities: [Todo], synchronize: true });
}

/** An error with an HTTP status, for the error middleware. */
class HttpError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

/** The app: every route runs in the request's session scope of `registry`. */
export function createApp(registry: SessionRegistry): Express {
  // Safe to create once: each call resolves to the session of the request that makes it.
  const todos = registry.getRepository(Todo);

  const app = express();
  app.use(express.json());
  app.use(sessionMiddleware({ registry }));

  // Never touches the database, so it takes no connection.
  app.get("/health", (_req, res) => {
    res.json({ ok: true, sessions: registry.stats().active });
  });

  app.get("/todos", async (_req, res) => {
    res.json(await todos.find({ order: { id: "ASC" } }));
  });

  app.get("/todos/:id", async (req, res) => {
    const todo = await todos.findOneBy({ id: Number(req.params.id) });
    if (todo === null) throw new HttpError(404, `no todo #${req.params.id}`);
    res.json(todo);
  });

  // A transaction that joins the request's session: committed before the response is sent.
  app.post("/todos", async (req, res) => {
    const { title } = (req.body ?? {}) as { title?: unknown };
    if (typeof title !== "string" || title === "") throw new HttpError(400, "expected a JSON body with a title");
    const todo = await registry.withTransaction((s) => s.getRepository(Todo).save({ title }));
    res.status(201).json(todo);
  });

  // Deep code finds the session without it being passed around.
  app.post("/todos/:id/done", async (req, res) => {
    res.json(await markDone(registry, Number(req.params.id)));
  });

  const errors: ErrorRequestHandler = (error: unknown, _req, res, _next) => {
    const status = error instanceof HttpError ? error.status : 500;
    res.status(status).json({ error: error instanceof Error ? error.message : String(error) });
  };
  app.use(errors);
  return app;
}

async function markDone(registry: SessionRegistry, id: number): Promise<Todo> {
  return registry.withTransaction(async () => {
    const repository = currentSession(registry).getRepository(Todo);
    const todo = await repository.findOneBy({ id });
    if (todo === null) throw new HttpError(404, `no todo #${id}`);
    todo.done = true;
    return repository.save(todo);
  });
}

/** Start the app on 127.0.0.1:`port` (0: any free port); resolves once it listens. */
export async function start(registry: SessionRegistry, port = 0): Promise<{ server: Server; url: string }> {
  const server = createServer(createApp(registry));
  await new Promise<void>((resolve) => server.listen(port, "127.0.0.1", resolve));
  const { port: actual } = server.address() as AddressInfo;
  return { server, url: `http://127.0.0.1:${actual}` };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const registry = createRegistry(process.env.DATABASE_URL);
  const { server, url } = await start(registry, Number(process.env.PORT ?? 0));
  console.log(`express-app listening on ${url}`);
  process.once("SIGTERM", () => {
    // Stop taking requests, let the open ones finish (10 s at most), then close the database.
    server.close();
    void registry.drain({ timeoutMs: 10_000, destroy: true }).then(({ forced }) => {
      console.log(`express-app stopped (${forced} sessions forced closed)`);
      process.exitCode = forced === 0 ? 0 : 1;
    });
  });
}
