/**
 * Transaction-per-test helpers for mocha, Jest, Vitest and `node:test`.
 *
 * @module typeorm-scoped-session/testing
 */
import { describe as describeValue } from "../core/describe.js";
import { defaultRegistry, SessionRegistry } from "../core/registry/registry.js";
import { beginTestTransaction, endTestTransaction } from "../core/registry/test-seam.js";
import type { Session } from "../core/session/session.js";

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
  /**
   * The test runner's `beforeEach` and `afterEach`, for runners that have no globals:
   * `node:test` (`import { beforeEach, afterEach } from "node:test"`) and Vitest
   * without `globals: true` (`import { beforeEach, afterEach } from "vitest"`).
   * @default the global `beforeEach`/`afterEach` (mocha, Jest, Vitest with `globals: true`)
   */
  hooks?: TestHooks;
}

/** A runner's function that registers a hook: `beforeEach` or `afterEach`. */
export type TestHook = (fn: () => Promise<void>) => unknown;

/** The `beforeEach` and `afterEach` of a test runner: see {@link TransactionalTestsOptions.hooks}. */
export interface TestHooks {
  /** Registers a hook that runs before each test of the enclosing suite. */
  readonly beforeEach: TestHook;
  /** Registers a hook that runs after each test of the enclosing suite. */
  readonly afterEach: TestHook;
}

const NO_HOOKS =
  "useTransactionalTests() found no global beforeEach()/afterEach(): call it inside a describe() of a mocha, " +
  "Jest or Vitest (globals: true) run, or pass your runner's hooks: " +
  'useTransactionalTests({ hooks: { beforeEach, afterEach } }) with both imported from "node:test" or "vitest"';

/**
 * In a test suite (mocha, Jest, Vitest or `node:test`), run each test inside one outer transaction that every block
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
 * It registers its two hooks with the runner's global `beforeEach`/`afterEach`
 * (mocha, Jest, Vitest with `globals: true`), or with those given as `hooks`
 * (`node:test`, Vitest without globals). Call it inside a `describe()`, so that the
 * hooks apply to that suite's tests.
 *
 * @param options - `registry` (default {@link defaultRegistry}), `runAfterCommit` (default true),
 *   `hooks` (default: the runner's globals)
 * @returns a function that gives the current test's session (it throws `TypeError` when
 *   called while no test runs, such as at the top of the `describe()`)
 * @throws TypeError when no `hooks` are given and the global `beforeEach`/`afterEach` are
 *   missing (the message says how to pass them), or for invalid options
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
 * @example
 * ```ts
 * // node:test (and Vitest without globals: import the two hooks from "vitest")
 * import { afterEach, beforeEach, describe, it } from "node:test";
 *
 * describe("signup", () => {
 *   useTransactionalTests({ registry: db, hooks: { beforeEach, afterEach } });
 *   it("stores the user", async () => { ... });
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
  const { beforeEach, afterEach } = runnerHooks(options.hooks);
  let session: Session | undefined;
  // No parameters: Jest and node:test would take a first parameter for a `done` callback.
  beforeEach(async function transactionalTestBegin() {
    session = await beginTestTransaction(registry, runAfterCommit);
  });
  afterEach(async function transactionalTestRollback() {
    session = undefined;
    await endTestTransaction(registry);
  });
  return () => {
    if (session === undefined) throw new TypeError("The test's session exists only while a test runs");
    return session;
  };
}

/** The `hooks` option checked, or the runner's globals; a `TypeError` saying how to pass them when there are none. */
function runnerHooks(hooks: TestHooks | undefined): TestHooks {
  if (hooks !== undefined) {
    if (typeof hooks !== "object" || hooks === null) {
      throw new TypeError(`Expected \`hooks\` to be { beforeEach, afterEach }, got ${describeValue(hooks)}`);
    }
    for (const key of ["beforeEach", "afterEach"] as const) {
      if (typeof hooks[key] !== "function") {
        throw new TypeError(
          `Expected \`hooks.${key}\` to be your test runner's ${key}(), got ${describeValue(hooks[key])}`,
        );
      }
    }
    return hooks;
  }
  const globals = globalThis as { beforeEach?: unknown; afterEach?: unknown };
  if (typeof globals.beforeEach !== "function" || typeof globals.afterEach !== "function")
    throw new TypeError(NO_HOOKS);
  return globals as TestHooks;
}
