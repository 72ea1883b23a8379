/**
 * A `node:test` suite using useTransactionalTests() with the runner's hooks passed in.
 * Run by spec/test-runners.spec.ts as `node --test build/spec/runners/node-test.suite.js`.
 */
import "reflect-metadata";
import assert from "node:assert/strict";
import { after, afterEach, beforeEach, describe, it } from "node:test";
import { createSessionRegistry } from "../../src/index.js";
import { useTransactionalTests } from "../../src/testing/index.js";
import { Note } from "../support/entities.js";

const db = createSessionRegistry({ name: "node-test", url: "sqlite::memory:", entities: [Note], synchronize: true });
const notes = db.getRepository(Note);

/** Code under test: it knows nothing of the tests around it. */
async function signup(body: string, fail = false): Promise<void> {
  await db.withTransaction(async (s) => {
    await s.getRepository(Note).insert({ body });
    if (fail) throw new Error(body);
  });
}

void describe("useTransactionalTests() under node:test", () => {
  after(async () => {
    // Out of test mode: nothing any test committed is left.
    assert.equal(await db.withSession((s) => s.getRepository(Note).count()), 0);
    await db.drain({ destroy: true });
  });

  const testSession = useTransactionalTests({ registry: db, hooks: { beforeEach, afterEach } });

  void it("blocks of the code under test commit into the test's transaction", async () => {
    await signup("ada");
    await assert.rejects(signup("undone", true));
    assert.deepEqual(
      (await notes.find()).map((n) => n.body),
      ["ada"],
    );
    assert.equal(db.current(), testSession());
  });

  void it("the next test sees a clean database", async () => {
    assert.equal(await notes.count(), 0);
  });

  void it("without hooks and without globals, the error says how to pass them", () => {
    assert.throws(
      () => useTransactionalTests({ registry: db }),
      (error: unknown) =>
        error instanceof TypeError &&
        /useTransactionalTests\(\{ hooks: \{ beforeEach, afterEach \} \}\)/.test(error.message),
    );
  });
});
