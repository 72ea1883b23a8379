/**
 * One throwaway MariaDB server for the whole run (see ./mariadb.ts), started lazily by the first suite
 * that asks for it and stopped when the test process exits. Nothing to add to `.mocharc.cjs`.
 *
 * In a spec:
 *
 *   before(async function () {
 *     this.timeout(120_000);
 *     if ((await startMariaDb()) === undefined) this.skip();
 *     url = await freshMariaDatabase("my_suite");
 *   });
 */
import { type MariaDbServer, startMariaDbServer } from "./mariadb.js";

export type { MariaDbServer } from "./mariadb.js";

let starting: Promise<MariaDbServer | undefined> | undefined;
let server: MariaDbServer | undefined;

/** The run's server, started on first call; `undefined` (then skip) where MariaDB is not available here. */
export function startMariaDb(): Promise<MariaDbServer | undefined> {
  starting ??= startMariaDbServer().then((s) => {
    server = s;
    if (s !== undefined) process.once("beforeExit", () => void s.stop());
    return s;
  });
  return starting;
}

/** The run's server once {@link startMariaDb} has resolved, else `undefined`. */
export function mariaDbServer(): MariaDbServer | undefined {
  return server;
}

/** Create a new empty database on the run's server for one suite and return its URL. */
export async function freshMariaDatabase(name?: string): Promise<string> {
  const s = await startMariaDb();
  if (!s) {
    throw new Error(
      "freshMariaDatabase(): no MariaDB server in this run (skip the suite when startMariaDb() resolves undefined)",
    );
  }
  return s.createDatabase(name);
}
