/**
 * node-cron 4 integration: {@link sessionTask} runs each tick in a session block, and
 * {@link DatabaseRunCoordinator} lets `distributed: true` tasks run each fire on exactly
 * one instance by keeping leases in the application's own database.
 *
 * node-cron is an optional peer dependency: only its types are used here.
 *
 * @module typeorm-scoped-session/cron
 */
import type { TaskContext } from "node-cron";
import { defaultRegistry } from "../index.js";
import type { Session, SessionOptions } from "../index.js";
import { describe } from "../core/describe.js";
import { resolveOptions } from "../core/block/option-checks.js";
import { findScope, storage } from "../core/scope.js";
import { tickBegins } from "./cron-coordinator.js";
import { noRegistryGiven } from "./cron-options.js";

export { DatabaseRunCoordinator } from "./cron-coordinator.js";
export type { DatabaseRunCoordinatorOptions } from "./cron-options.js";

/** The body of a {@link sessionTask}: receives the tick's session and node-cron's context. */
export type SessionTaskBody<T> = (session: Session, context: TaskContext) => T | Promise<T>;

/**
 * Make a node-cron 4 task function that runs `fn(session, context)` in
 * `withSession` of the registry named by `options.registry` (default: the default
 * registry): each tick is a unit of work whose session is removed (rolled back if
 * needed, its connection released) before the tick settles.
 *
 * An application that made its own registry (`const db = createSessionRegistry(...)`)
 * passes it here, as it does to {@link DatabaseRunCoordinator}:
 * `sessionTask(fn, { registry: db })`. Without the option the task uses the default
 * registry; while that has no data source (no `configureSessions()`), each tick
 * rejects with a {@link typeorm-scoped-session!RegistryNotConfiguredError} that says
 * so, which node-cron logs and reports as `execution:failed`.
 *
 * A tick never joins a scope that has already ended. Timers inherit the async
 * context in which they were created, so a task scheduled from inside a session
 * block would otherwise find that block's closed scope on every tick.
 *
 * @param fn - the body; receives the session and node-cron's {@link TaskContext}
 * @param options - block options (see {@link SessionOptions}), checked now; `name`
 *   defaults to the task's name (`context.task.name`), else `fn`'s name
 * @returns a task function for `cron.schedule()` / `cron.createTask()`; its promise
 *   settles with `fn`'s result after the session is removed, and rejects as
 *   {@link typeorm-scoped-session!withSession} does (`fn`'s own error included)
 * @throws TypeError when `fn` is not a function, TypeError/RangeError on invalid options
 * @example
 * ```ts
 * import cron from "node-cron";
 * import { sessionTask } from "typeorm-scoped-session/cron";
 *
 * cron.schedule(
 *   "0 * * * *",
 *   sessionTask(async (s, { date }) => {
 *     await s.getRepository(Invoice).update({ dueAt: LessThan(date), state: "open" }, { state: "overdue" });
 *   }, { registry: db, transaction: true }),
 *   { name: "overdue-invoices" },
 * );
 * ```
 */
export function sessionTask<T>(fn: SessionTaskBody<T>, options?: SessionOptions): (context: TaskContext) => Promise<T> {
  if (typeof fn !== "function") throw new TypeError(`Expected the task body to be a function, got ${describe(fn)}`);
  resolveOptions(options, undefined, false); // throws now rather than on every tick
  const registry = options?.registry ?? defaultRegistry;
  const defaulted = options?.registry === undefined;
  const fallbackName = fn.name === "" ? undefined : fn.name;
  return function cronSessionTask(context: TaskContext): Promise<T> {
    const name = options?.name ?? context?.task?.name ?? fallbackName;
    // A fire granted by a DatabaseRunCoordinator of this process: drain() waits for its completion.
    const key = context?.task?.name === undefined ? undefined : `${context.task.name}:${context.date.toISOString()}`;
    const refused = key === undefined ? undefined : tickBegins(registry, key);
    let ran = false;
    const tick = () =>
      registry.withSession(
        (session) => {
          ran = true;
          return fn(session, context);
        },
        { ...options, name },
      );
    // The scope of the code that scheduled the task, captured by node-cron's timers, is over.
    let ticking = findScope(storage.getStore(), registry)?.ended === true ? storage.exit(tick) : tick();
    if (refused !== undefined) {
      ticking = ticking.catch((error: unknown) => {
        if (!ran) refused();
        return Promise.reject(error);
      });
    }
    return defaulted
      ? ticking.catch((error: unknown) => Promise.reject(noRegistryGiven(error, "sessionTask")))
      : ticking;
  };
}
