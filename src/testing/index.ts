/**
 * Transaction-per-test helpers for mocha.
 *
 * @module typeorm-scoped-session/testing
 */
import { describe as describeValue } from "../core/options.js";
import { defaultRegistry, SessionRegistry } from "../core/registry.js";
import type { Session } from "../core/session.js";

/** Options of {@link useTransactionalTests}. */
export interface TransactionalTestsOptions {
  /**
   * The registry whose blocks join each test's transaction.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
  /**
   * Run `afterCommit` callbacks when a block's savepoint is released (as they would
   * run after its COMMIT); `false` drops them.
   * @default true
   */
  runAfterCommit?: boolean;
}

type Hook = (fn: (this: unknown) => Promise<void>) => void;

/**
 * In a mocha suite, run each test inside one outer transaction that every block
 * of the code under test joins (their commits become savepoints) and that is
 * rolled back after the test: the next test sees a clean database.
 *
 * The outer transaction is invisible to the code under test: a block that would
 * be outermost behaves so (`durable` is allowed, `isolation` and `readOnly` are
 * ignored rather than rejected, `inTransaction` is false outside its blocks), and
 * its `afterCommit` callbacks run when its savepoint is released (at once for a
 * block with no transaction of its own), unless `runAfterCommit: false`. Request
 * scopes (`registry.scope()`, the middleware) join it too. A second session
 * (`requiresNew`, `detached()`) is not part of it: on SQLite, whose one connection
 * the test's transaction holds, it rejects with {@link typeorm-scoped-session!PropagationError}; on
 * PostgreSQL it commits for real.
 *
 * @param options - `registry` (default {@link defaultRegistry}), `runAfterCommit` (default true)
 * @returns a function that gives the current test's session (it throws `TypeError` when
 *   called while no test runs, such as at the top of the `describe()`)
 * @throws TypeError when mocha's `beforeEach`/`afterEach` globals are missing (not a mocha run),
 *   or for invalid options
 * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError} (failing each test's `beforeEach`
 *   hook) while the registry has no data source; an `Error` there too when the registry is already in
 *   a transactional test (for example, through a call in an enclosing suite)
 * @example
 * ```ts
 * describe("signup", () => {
 *   useTransactionalTests({ registry: db });
 *   it("stores the user", async () => {
 *     await signup("ada@example.com");                  // commits: a savepoint here
 *     expect(await db.getRepository(User).count()).to.equal(1);
 *   });                                                 // rolled back after the test
 * });
 * ```
 */
export function useTransactionalTests(options: TransactionalTestsOptions = {}): () => Session {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`Expected useTransactionalTests() options to be an object, got ${describeValue(options)}`);
  }
  const { registry = defaultRegistry, runAfterCommit = true } = options;
  if (!(registry instanceof SessionRegistry)) {
    throw new TypeError(`Expected \`registry\` to be a SessionRegistry, got ${describeValue(registry)}`);
  }
  if (typeof runAfterCommit !== "boolean") {
    throw new TypeError(`Expected \`runAfterCommit\` to be a boolean, got ${describeValue(runAfterCommit)}`);
  }
  const hooks = globalThis as { beforeEach?: Hook; afterEach?: Hook };
  if (typeof hooks.beforeEach !== "function" || typeof hooks.afterEach !== "function") {
    throw new TypeError("useTransactionalTests() registers mocha hooks: call it inside a describe() of a mocha run");
  }
  let session: Session | undefined;
  hooks.beforeEach(async function transactionalTestBegin() {
    session = await registry._beginTestTransaction(runAfterCommit);
  });
  hooks.afterEach(async function transactionalTestRollback() {
    session = undefined;
    await registry._endTestTransaction();
  });
  return () => {
    if (session === undefined) throw new TypeError("The test's session exists only while a test runs");
    return session;
  };
}
