/**
 * HTTP: an Express 5 route doing one primary-key read per request, one app per implementation, all in this
 * process (so every one runs with both AsyncLocalStorages enabled), driven by autocannon from a child
 * process for a bounded time, in interleaved rounds.
 */
import { fork, type ChildProcess } from "node:child_process";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";
import express from "express";
import type { DataSource } from "typeorm";
import { Propagation, runInTransaction } from "typeorm-transactional";
import { sessionMiddleware } from "../src/integrations/express.js";
import type { Backend } from "./backends.js";
import { BenchNote } from "./entities.js";
import type { LoadReply, LoadRequest } from "./load-child.js";
import { rotate } from "./stats.js";

export type HttpImplId = "floor" | "ttRun" | "oursMiddleware" | "oursBlock";

export const HTTP_IMPLS: readonly { id: HttpImplId; label: string }[] = [
  { id: "floor", label: "floor: QueryRunner try/finally in the handler" },
  { id: "ttRun", label: "typeorm-transactional runInTransaction (SUPPORTS)" },
  { id: "oursMiddleware", label: "ours sessionMiddleware + registry.manager" },
  { id: "oursBlock", label: "ours withSession in the handler" },
];

export interface HttpOptions {
  readonly rounds: number;
  readonly durationS: number;
  readonly warmupS: number;
  readonly connections: number;
}

export interface HttpSamples {
  readonly rps: number[];
  readonly p99: number[];
  errors: number;
  total: number;
}

/** Keyed by `${backend label}/${impl}`. */
export type HttpResults = Map<string, HttpSamples>;

function app(b: Backend, impl: HttpImplId): express.Express {
  const a = express();
  const id = (req: express.Request) => Number(req.params.id);
  switch (impl) {
    case "floor":
      a.get("/notes/:id", async (req, res) => {
        const qr = b.plain.createQueryRunner();
        try {
          res.json(await qr.manager.findOneBy(BenchNote, { id: id(req) }));
        } finally {
          await qr.release();
        }
      });
      break;
    case "ttRun": {
      const tt = b.tt as DataSource;
      const supports = { connectionName: b.ttName, propagation: Propagation.SUPPORTS };
      a.get("/notes/:id", async (req, res) => {
        res.json(await runInTransaction(() => tt.manager.findOneBy(BenchNote, { id: id(req) }), supports));
      });
      break;
    }
    case "oursMiddleware": {
      const registry = b.registry;
      a.use(sessionMiddleware({ registry }));
      a.get("/notes/:id", async (req, res) => {
        res.json(await registry.manager.findOneBy(BenchNote, { id: id(req) }));
      });
      break;
    }
    case "oursBlock": {
      const registry = b.registry;
      a.get("/notes/:id", async (req, res) => {
        res.json(await registry.withSession((s) => s.manager.findOneBy(BenchNote, { id: id(req) })));
      });
      break;
    }
  }
  // When autocannon stops, it drops its connections: the request scopes end under reads still running, which
  // then fail with SessionClosedError by design. Nobody is left to answer; count nothing, log nothing.
  a.use((_error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
    if (!res.headersSent) res.status(500).end();
  });
  return a;
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port));
  });
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  });
}

class LoadGenerator {
  readonly #child: ChildProcess;
  readonly #waiting = new Map<number, (reply: LoadReply) => void>();
  #next = 0;

  constructor() {
    this.#child = fork(fileURLToPath(new URL("./load-child.js", import.meta.url)), [], { stdio: "inherit" });
    this.#child.on("message", (reply: LoadReply) => {
      this.#waiting.get(reply.id)?.(reply);
      this.#waiting.delete(reply.id);
    });
  }

  /** Bounded by autocannon's duration plus a grace period. */
  run(url: string, durationS: number, connections: number): Promise<LoadReply> {
    const request: LoadRequest = { id: ++this.#next, url, durationS, connections };
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => {
          this.#waiting.delete(request.id);
          reject(new Error(`autocannon did not answer within ${durationS + 30} s`));
        },
        (durationS + 30) * 1000,
      );
      this.#waiting.set(request.id, (reply) => {
        clearTimeout(timer);
        resolve(reply);
      });
      this.#child.send(request);
    });
  }

  stop(): void {
    this.#child.disconnect();
  }
}

export async function runHttp(
  backends: readonly Backend[],
  options: HttpOptions,
  log: (line: string) => void,
): Promise<HttpResults> {
  const targets: { key: string; url: string; server: Server }[] = [];
  for (const b of backends) {
    for (const impl of HTTP_IMPLS) {
      if (impl.id === "ttRun" && b.tt === undefined) continue;
      const server = createServer(app(b, impl.id));
      const port = await listen(server);
      targets.push({ key: `${b.label}/${impl.id}`, url: `http://127.0.0.1:${port}/notes/42`, server });
    }
  }
  const load = new LoadGenerator();
  const results: HttpResults = new Map();
  try {
    const groups = backends.map((b) => targets.filter((t) => t.key.startsWith(`${b.label}/`)));
    if (options.warmupS > 0) for (const t of targets) await load.run(t.url, options.warmupS, options.connections);
    for (let round = 0; round < options.rounds; round++) {
      for (const group of groups) {
        for (const t of rotate(group, round)) {
          const reply = await load.run(t.url, options.durationS, options.connections);
          if (reply.error !== undefined) log(`  ${t.key}: autocannon failed: ${reply.error}`);
          let r = results.get(t.key);
          if (r === undefined) results.set(t.key, (r = { rps: [], p99: [], errors: 0, total: 0 }));
          r.rps.push(reply.rps);
          r.p99.push(reply.p99);
          r.errors += reply.errors + reply.non2xx;
          r.total += reply.total;
        }
      }
      log(`  HTTP round ${round + 1}/${options.rounds} done`);
    }
  } finally {
    load.stop();
    for (const t of targets) await close(t.server);
  }
  return results;
}
