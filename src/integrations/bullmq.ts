/**
 * BullMQ 5 integration: {@link sessionProcessor} runs each job in a session block of
 * its own, and {@link addAfterCommit} enqueues a job only once the transaction that
 * asked for it has committed.
 *
 * bullmq is an optional peer dependency: only its types are used here.
 *
 * @module typeorm-scoped-session/bullmq
 */
import type { Job, JobsOptions, Queue } from "bullmq";
import { defaultRegistry, SessionRegistry } from "../index.js";
import type { Session, SessionOptions } from "../index.js";
import { describe } from "../core/describe.js";
import { resolveOptions } from "../core/block/option-checks.js";
import { storage } from "../core/scope.js";
import { DROPPED } from "../core/session/session.js";

/** The body of a {@link sessionProcessor}: receives the job's session and the job. */
export type SessionProcessorBody<T, R, N extends string> = (session: Session, job: Job<T, R, N>) => R | Promise<R>;

/**
 * Make a BullMQ 5 processor that runs `fn(session, job)` in a block of its own
 * (`withSession` of `options.registry`, default {@link typeorm-scoped-session!defaultRegistry}): each job
 * is a unit of work whose session is removed (rolled back if needed, its connection
 * released) before BullMQ learns the outcome. With `transaction: true` each job runs
 * in one transaction, committed when `fn` resolves, rolled back when it throws.
 *
 * A job never joins the scope of the code that created the `Worker`, even when that
 * code ran inside a session block (a worker started by the web app's process): each
 * attempt of a job (BullMQ's `attempts`) opens a session of its own. Under
 * `useTransactionalTests()` a job joins the test's transaction, as a request does.
 *
 * A job whose body throws fails in BullMQ with that same error, once the block has
 * settled: the rollback and the `afterRollback` callbacks are done by then. What `fn`
 * returns is the job's return value.
 *
 * @param fn - the body; receives the session and the BullMQ {@link Job}
 * @param options - block options (see {@link typeorm-scoped-session!SessionOptions}), checked now;
 *   `name` defaults to `queue:job-name`. `propagation: "mandatory"` is refused: a job
 *   has no scope to join
 * @returns a processor for `new Worker(queueName, processor, workerOptions)`
 * @throws TypeError when `fn` is not a function, TypeError/RangeError on invalid options
 * @example
 * ```ts
 * import { Worker } from "bullmq";
 * import { sessionProcessor } from "typeorm-scoped-session/bullmq";
 *
 * const worker = new Worker(
 *   "emails",
 *   sessionProcessor(async (s, job) => {
 *     const user = await s.getRepository(User).findOneByOrFail({ id: job.data.userId });
 *     await s.getRepository(Email).insert({ to: user.email, kind: job.name });
 *   }, { transaction: true, registry: db }),
 *   { connection: { host: "127.0.0.1", port: 6379 } },
 * );
 * // at shutdown: the worker first, so that no job starts on a draining registry
 * await worker.close();
 * await db.drain();
 * ```
 */
export function sessionProcessor<T = unknown, R = unknown, N extends string = string>(
  fn: SessionProcessorBody<T, R, N>,
  options?: SessionOptions,
): (job: Job<T, R, N>, token?: string) => Promise<R> {
  if (typeof fn !== "function") throw new TypeError(`Expected the job body to be a function, got ${describe(fn)}`);
  const resolved = resolveOptions(options, undefined, false); // throws now rather than on every job
  if (resolved.propagation === "mandatory") {
    throw new TypeError(
      'Expected `propagation` of a job to be "required" or "requiresNew", got "mandatory": a job has no scope to join',
    );
  }
  const registry = options?.registry ?? defaultRegistry;
  return function bullmqSessionProcessor(job: Job<T, R, N>): Promise<R> {
    const name = options?.name ?? `${job.queueName}:${job.name}`;
    // The Worker's loop runs in the context that created it: a job must not join that scope.
    return storage.exit(() => registry.withSession((session) => fn(session, job), { ...options, name }));
  };
}

/** The last argument of {@link addAfterCommit}. */
export interface AddAfterCommitOptions {
  /**
   * The registry whose current scope's session decides when the job is added.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
}

/**
 * Add a job to `queue` once the current transaction has committed, so that a job is
 * never processed before the rows it refers to are visible, and never enqueued for
 * work that rolled back.
 *
 * - Inside a transaction of the current scope's session of `registry`: the job is
 *   added (`queue.add(name, data, jobOptions)`) after the outermost COMMIT succeeds;
 *   it is dropped when that transaction, or the savepoint the call was made in, rolls
 *   back. The block that commits settles once the job is in the queue.
 * - Outside a transaction, or with no session: the job is added at once.
 *
 * The promise resolves with the {@link Job} once added, or with `undefined` when a
 * rollback dropped it. Under `useTransactionalTests({ runAfterCommit: false })` a
 * dropped job resolves `undefined` when its block would have committed, or at the
 * latest when the test ends. In a block with `retry`, the call made by an attempt that
 * is re-run resolves `undefined` (the re-run makes its own call, which settles as above).
 *
 * **Do not `await` it inside its own transaction:** it resolves after the COMMIT,
 * which comes only after the body has returned, so the block would wait forever.
 * Write `void addAfterCommit(...)`, or keep the promise and await it after the block.
 * When adding fails after the COMMIT (Redis is down), the error is reported through
 * the registry's `error` event and the promise rejects with it; a promise nobody
 * awaits then does not crash the process with an unhandled rejection.
 *
 * @param queue - a BullMQ {@link Queue}
 * @param name - the job's name
 * @param data - the job's data
 * @param jobOptions - BullMQ job options, passed to `queue.add()` as they are
 * @param options - `registry` (default {@link typeorm-scoped-session!defaultRegistry})
 * @returns the added job, or `undefined` when a rollback dropped it
 * @throws TypeError (as a rejection) when `queue` has no `add()` method or `registry` is not a
 *   SessionRegistry; {@link typeorm-scoped-session!SessionClosedError} (as a rejection) when the
 *   current scope's session is closing or closed
 * @example
 * ```ts
 * import { addAfterCommit } from "typeorm-scoped-session/bullmq";
 *
 * await db.withTransaction(async (s) => {
 *   const user = await s.getRepository(User).save({ email });
 *   void addAfterCommit(emails, "welcome", { userId: user.id }, undefined, { registry: db });
 * }); // COMMIT, then the job is added, then the block settles
 * ```
 */
export function addAfterCommit<T, R, N extends string>(
  queue: Queue<T, R, N>,
  name: N,
  data: T,
  jobOptions?: JobsOptions,
  options: AddAfterCommitOptions = {},
): Promise<Job<T, R, N> | undefined> {
  try {
    if (typeof (queue as { add?: unknown } | null)?.add !== "function") {
      throw new TypeError(`Expected \`queue\` to be a BullMQ Queue, got ${describe(queue)}`);
    }
    if (typeof options !== "object" || options === null) {
      throw new TypeError(`Expected addAfterCommit() options to be an object, got ${describe(options)}`);
    }
    const { registry = defaultRegistry } = options;
    if (!(registry instanceof SessionRegistry)) {
      throw new TypeError(`Expected \`registry\` to be a SessionRegistry, got ${describe(registry)}`);
    }
    const add = () => queue.add(name as never, data as never, jobOptions) as Promise<Job<T, R, N>>;
    const session = registry.tryCurrent();
    return session === undefined ? add() : afterCommitOf(session, add);
  } catch (error) {
    return Promise.reject(error);
  }
}

/**
 * Jobs of a test's session still waiting for their COMMIT. A test's outer transaction drops
 * afterCommit callbacks silently (`runAfterCommit: false`), and only it: its session closes
 * after every level whose callbacks were still to run, so its end settles what is left.
 * Other sessions always run one of the two callbacks.
 */
const waitingInTest = new WeakMap<Session, Set<() => void>>();

function dropAtTestEnd(session: Session, dropped: () => void): () => void {
  let waiting = waitingInTest.get(session);
  if (waiting === undefined) {
    const all = (waiting = new Set());
    waitingInTest.set(session, all);
    session.signal.addEventListener("abort", () => all.forEach((drop) => drop()), { once: true });
  }
  waiting.add(dropped);
  const set = waiting;
  return () => set.delete(dropped);
}

/** Run `add` through `session.afterCommit()`, settling once: the job, or `undefined` when dropped. */
function afterCommitOf<J>(session: Session, add: () => Promise<J>): Promise<J | undefined> {
  let started = false;
  let forget = (): unknown => undefined;
  let settle!: (outcome: J | undefined | Promise<J>) => void;
  const outcome = new Promise<J | undefined>((resolve) => (settle = resolve));
  const dropped = (): void => {
    if (started) return;
    started = true;
    forget();
    settle(undefined);
  };
  session.afterCommit(() => {
    if (started) return;
    started = true;
    forget();
    const adding = add();
    settle(adding);
    return adding; // the committing block settles once the job is in the queue (a failure goes to `error`)
  });
  if (!started && !session.inTransaction) {
    dropped(); // outside a transaction afterCommit runs at once, unless the test's transaction drops it
  } else if (!started) {
    // A failed attempt that `retry` re-runs drops its afterRollback callbacks: told so through DROPPED.
    session.afterRollback(Object.assign(dropped, { [DROPPED]: dropped }));
    if (session._test) forget = dropAtTestEnd(session, dropped);
  }
  outcome.catch(() => undefined); // reported through `error`; a `void` call must not crash the process
  return outcome;
}
