import type { SessionEvent, SessionEventName, SessionRegistry } from "../../src/index.js";

/**
 * How much of the load runs (fault injection, ledgers, interleaving): `TSS_LOAD=0.2` runs a fifth
 * of each, as CI does on its extra Node lines; every test still runs. Default 1.
 */
export function load(count: number): number {
  const factor = Number(process.env.TSS_LOAD ?? "1");
  return Math.max(1, Math.round(count * (Number.isFinite(factor) && factor > 0 ? Math.min(factor, 1) : 1)));
}

/** Yield to the event loop `n` times (lets other blocks run; never used to wait for a result). */
export async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}

/** A promise with its resolve function, for ordering steps between concurrent blocks. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** Record every event of a registry as `name#sessionId`. */
export function recordEvents(
  registry: SessionRegistry,
  names: SessionEventName[] = ["open", "connect", "begin", "commit", "rollback", "close", "error"],
): { log: string[]; events: (SessionEvent & { event: SessionEventName })[] } {
  const log: string[] = [];
  const events: (SessionEvent & { event: SessionEventName })[] = [];
  for (const name of names) {
    registry.on(name, (e) => {
      log.push(`${name}#${e.session.id}${e.savepoint ? ":sp" : ""}`);
      events.push({ ...e, event: name });
    });
  }
  return { log, events };
}

/** A seeded pseudo-random generator (mulberry32), so that failures reproduce. */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The rejection reason of a promise that must reject. */
export async function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error("expected the promise to reject, but it resolved");
}
