import type { IncomingMessage, ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { requestScope } from "../core/block/open.js";
import { describe } from "../core/describe.js";
import { defaultRegistry, SessionRegistry } from "../core/registry/registry.js";
import type { RequestEnd } from "../core/scope.js";

// What the web integrations share: their options, and when a request is over.

/** The `registry` option, checked. */
export function registryOption(options: { registry?: SessionRegistry }, caller: string): SessionRegistry {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`Expected the options of ${caller}() to be an object, got ${describe(options)}`);
  }
  const { registry = defaultRegistry } = options;
  if (!(registry instanceof SessionRegistry)) {
    throw new TypeError(`Expected \`registry\` to be a SessionRegistry, got ${describe(registry)}`);
  }
  return registry;
}

/** Why the request is over, judged now: the response went out whole, or it never will. */
function endReason(res: ServerResponse): RequestEnd {
  return res.writableFinished ? "response-finished" : "client-disconnected";
}

/**
 * Call `done` once, with the reason, when the response has finished or the
 * connection has closed before it did (the client went away), whichever comes
 * first; at once when that has already happened. The connection is watched too,
 * because a response queued behind another one on a keep-alive connection gets no
 * `close` event of its own. Returns a function that stops listening.
 */
export function onResponseEnd(
  req: IncomingMessage,
  res: ServerResponse,
  done: (reason: RequestEnd) => void,
): () => void {
  const socket = req.socket as Socket | null;
  if (res.writableFinished || res.destroyed || socket?.destroyed === true) {
    done(endReason(res));
    return () => {};
  }
  const stop = (): void => {
    res.off("finish", end);
    res.off("close", end);
    socket?.off("close", end);
  };
  const end = (): void => {
    stop();
    done(endReason(res));
  };
  res.on("finish", end);
  res.on("close", end);
  socket?.on("close", end);
  return stop;
}

/**
 * Run the rest of the request (`next()`) in a new request scope of `registry`, ended
 * when the response has finished or the client has gone away: the one request-scope
 * path of the integrations that see Node's request and response (the Express
 * middleware, the Fastify plugin's hook, the Nest middleware on both platforms). When
 * the scope cannot be opened (the registry drains, has no data source, or fails to
 * initialize), `next` gets the error instead, for the framework's error handling, and
 * nothing of the request runs.
 */
export function enterRequestScope(
  registry: SessionRegistry,
  req: IncomingMessage,
  res: ServerResponse,
  next: (error?: unknown) => void,
): void {
  let passed = false;
  requestScope(registry, (end) => {
    // Listen first: whatever `next()` starts may end the response.
    onResponseEnd(req, res, end);
    passed = true;
    next();
  }).catch((error: unknown) => {
    // A framework catches what its own `next` throws; an error after it was called is not the request's.
    if (!passed) next(error);
  });
}
