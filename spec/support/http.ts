// Real HTTP for the web integration specs: requests, servers on port 0, bounded waits.
import { type ClientRequest, createServer, request, type RequestListener, type Server } from "node:http";
import type { AddressInfo } from "node:net";

/** A response as the client got it. */
export interface Reply {
  status: number;
  body: string;
}

/**
 * A real HTTP request to 127.0.0.1:`port`, on a connection of its own. `sent` gets the
 * client request, so that a test can destroy it (the client going away).
 */
export function send(
  port: number,
  path: string,
  init: { method?: string; json?: unknown; sent?: (req: ClientRequest) => void } = {},
): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const body = init.json === undefined ? undefined : JSON.stringify(init.json);
    const req = request(
      {
        host: "127.0.0.1",
        port,
        path,
        method: init.method ?? "GET",
        agent: false,
        headers: body === undefined ? {} : { "content-type": "application/json" },
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => (text += chunk));
        res.on("end", () => resolve({ status: res.statusCode!, body: text }));
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end(body);
    init.sent?.(req);
  });
}

/** Listen on 127.0.0.1, port 0; resolves to the port and a function that stops the server. */
export async function listen(
  handler: (...args: Parameters<RequestListener>) => unknown,
): Promise<{ port: number; close: () => Promise<void> }> {
  // A Koa handler settles its own errors: its promise never rejects.
  const server: Server = createServer((req, res) => void handler(req, res));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** `promise`, or a rejection naming `what` after `ms` milliseconds. */
export async function within<T>(promise: Promise<T>, what: string, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** What {@link idle} needs of a registry: also fits the example's, which comes from dist/. */
export interface Watched {
  stats(): { active: number };
  on(event: "close", listener: () => void): unknown;
  off(event: "close", listener: () => void): unknown;
}

/** Resolves once no session of `registry` is open (checked at once and on every `close` event). */
export function idle(registry: Watched): Promise<void> {
  return within(
    new Promise<void>((resolve) => {
      const check = (): void => {
        if (registry.stats().active !== 0) return;
        registry.off("close", check);
        resolve();
      };
      registry.on("close", check);
      check();
    }),
    "every session to close",
  );
}
