import type { IncomingMessage, ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { describe } from "../core/options.js";
import { defaultRegistry, SessionRegistry } from "../core/registry.js";

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

/**
 * Call `done` once, when the response has finished or the connection has closed
 * (the client went away), whichever comes first; at once when that has already
 * happened. The connection is watched too, because a response queued behind
 * another one on a keep-alive connection gets no `close` event of its own.
 * Returns a function that stops listening.
 */
export function onResponseEnd(req: IncomingMessage, res: ServerResponse, done: () => void): () => void {
  const socket = req.socket as Socket | null;
  if (res.writableFinished || res.destroyed || socket?.destroyed === true) {
    done();
    return () => {};
  }
  const stop = (): void => {
    res.off("finish", end);
    res.off("close", end);
    socket?.off("close", end);
  };
  const end = (): void => {
    stop();
    done();
  };
  res.on("finish", end);
  res.on("close", end);
  socket?.on("close", end);
  return stop;
}
