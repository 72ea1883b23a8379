/**
 * A small NestJS app on typeorm-scoped-session: `@nestjs/typeorm` for the DataSource,
 * `SessionModule` for one session per request, a `@Transactional()` service on
 * session repositories. Runs on Express, or on Fastify with PLATFORM=fastify.
 *
 *   npm run build && npx tsc -p tsconfig.json && node build/examples/nest-app/main.js
 *
 * runs it on SQLite in memory (DATABASE_URL=postgres://... for PostgreSQL) and prints its URL; try
 *   curl -X POST -H 'content-type: application/json' -d '{"name":"Tom"}' http://127.0.0.1:PORT/cats
 *   curl -X POST -H 'content-type: application/json' -d '{"name":"Felix"}' http://127.0.0.1:PORT/cats
 *   curl -X POST -H 'content-type: application/json' -d '{"from":1,"to":2,"lives":12}' http://127.0.0.1:PORT/cats/give
 *   curl http://127.0.0.1:PORT/cats     # the failed gift changed nothing
 */
import "reflect-metadata";
import type { Server } from "node:http";
import type { AddressInfo } from "node:net";
import { pathToFileURL } from "node:url";
import type { INestApplication } from "@nestjs/common";
import { NestFactory } from "@nestjs/core";
import { FastifyAdapter } from "@nestjs/platform-fastify";
import { appModule } from "./app.module.js";

/** Create and start the app on 127.0.0.1:`port` (0: any free port). */
export async function start(
  options: { url?: string; platform?: "express" | "fastify"; port?: number } = {},
): Promise<{ app: INestApplication; url: string }> {
  const module = appModule(options.url);
  const app =
    options.platform === "fastify"
      ? await NestFactory.create(module, new FastifyAdapter(), { logger: ["error", "warn"] })
      : await NestFactory.create(module, { logger: ["error", "warn"] });
  // SIGTERM/SIGINT close the app: SessionModule drains the sessions, @nestjs/typeorm closes the DataSource.
  app.enableShutdownHooks();
  await app.listen(options.port ?? 0, "127.0.0.1");
  const { port } = (app.getHttpServer() as Server).address() as AddressInfo;
  return { app, url: `http://127.0.0.1:${port}` };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const platform = process.env.PLATFORM === "fastify" ? "fastify" : "express";
  const { url } = await start({ url: process.env.DATABASE_URL, platform, port: Number(process.env.PORT ?? 0) });
  console.log(`nest-app (${platform}) listening on ${url}`);
}
