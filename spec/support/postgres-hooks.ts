/**
 * Mocha root hooks: one throwaway PostgreSQL server for the whole run (see ./postgres.ts).
 * Loaded by `.mocharc.cjs` (`require: ["build/spec/support/postgres-hooks.js"]`).
 *
 * In a spec:
 *
 *   before(async function () {
 *     if (!pgServer()) this.skip();
 *     url = await freshDatabase("my_suite");
 *   });
 */
import { startPostgres, type PgServer } from "./postgres.js";

export { pgDataSource, type PgServer } from "./postgres.js";

let server: PgServer | undefined;
let started = false;

export const mochaHooks = {
  async beforeAll(this: Mocha.Context): Promise<void> {
    this.timeout(90_000);
    started = true;
    server = await startPostgres();
  },
  async afterAll(this: Mocha.Context): Promise<void> {
    this.timeout(30_000);
    const s = server;
    server = undefined;
    await s?.stop();
  },
};

/** The run's server, or `undefined` when PostgreSQL is not available here (then skip). */
export function pgServer(): PgServer | undefined {
  if (!started) {
    throw new Error(
      "pgServer(): the PostgreSQL root hooks did not run; add build/spec/support/postgres-hooks.js to `require` in .mocharc.cjs",
    );
  }
  return server;
}

/** Create a new empty database on the run's server for one suite and return its URL. */
export async function freshDatabase(name?: string): Promise<string> {
  const s = pgServer();
  if (!s)
    throw new Error("freshDatabase(): no PostgreSQL server in this run (skip the suite when pgServer() is undefined)");
  return s.createDatabase(name);
}
