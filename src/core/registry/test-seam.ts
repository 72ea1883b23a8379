import type { RegistryHost } from "./host.js";
import type { SessionRegistry } from "./registry.js";
import type { Session } from "../session/session.js";

/*
 * What useTransactionalTests() needs of the core, in one place. While a test runs, the
 * registry's `_testScope` holds the test's scope; scope lookups (scope.ts) fall back to
 * it outside every block, and new scopes and request scopes (block/open.ts) join it.
 */

/**
 * @internal Open the test's session and its outer transaction, invisible to the code
 * under test, which joins it from anywhere.
 */
export async function beginTestTransaction(registry: SessionRegistry, runAfterCommit: boolean): Promise<Session> {
  if (registry._testScope !== undefined) {
    throw new Error(
      `Registry "${registry.name}" is already in a transactional test: call useTransactionalTests() once per suite`,
    );
  }
  const ready = registry._ready();
  const host = ready instanceof Promise ? await ready : ready;
  const session = (host as RegistryHost).createSession("transactional test");
  session._test = true;
  await session._enter(undefined, {
    isolation: undefined,
    readOnly: false,
    durable: false,
    savepoint: true,
    name: "transactional test",
    invisible: true,
    runAfterCommit,
  });
  registry._testScope = { registry, session, ended: false };
  return session;
}

/** @internal Roll the test's transaction back and close its session. */
export async function endTestTransaction(registry: SessionRegistry): Promise<void> {
  const scope = registry._testScope;
  registry._testScope = undefined;
  if (scope?.session !== undefined) await scope.session._close();
}
