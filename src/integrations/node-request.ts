import type { IncomingMessage, ServerResponse } from "node:http";
import { requestScope } from "../core/block.js";
import type { SessionRegistry } from "../core/registry.js";
import { onResponseEnd } from "./http.js";

// The request scope of the integrations that see Node's own request and response
// (the Fastify plugin's hook, the Nest middleware on both platforms).

/**
 * Run the rest of the request (`next()`) in a new request scope of `registry`, ended
 * when the response has finished or the client has gone away. When the scope cannot be
 * opened (the registry drains, has no data source, or fails to initialize), `next` gets
 * the error instead, for the framework's error handling.
 *
 * @internal
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
    onResponseEnd(req, res, () => end(res.writableFinished ? "response-finished" : "client-disconnected"));
    passed = true;
    next();
  }).catch((error: unknown) => {
    // A framework catches what its own `next` throws; an error after it was called is not the request's.
    if (!passed) next(error);
  });
}
