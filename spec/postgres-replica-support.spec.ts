import { expect } from "chai";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import pg from "pg";
import { startReplicatedPostgres, type ReplicatedPg } from "./support/postgres-replica.js";
import { rejectionOf } from "./support/util.js";

/** Run `fn` with one client on `url`, closed afterwards. */
async function withClient<T>(url: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5_000 });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/** The postmaster's pid, from the first line of postmaster.pid. */
function postmasterPid(dir: string): number {
  return Number(readFileSync(join(dir, "data", "postmaster.pid"), "utf8").split("\n")[0]);
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

describe("postgres replica support", () => {
  let pair: ReplicatedPg | undefined;

  before(async function () {
    this.timeout(90_000);
    pair = await startReplicatedPostgres();
    if (!pair) this.skip();
  });

  after(async () => {
    await pair?.stop();
  });

  it("runs the standby in recovery and the primary not", async () => {
    const [primary] = await pair!.primary.adminQuery<{ r: boolean }>("SELECT pg_is_in_recovery() AS r");
    const [standby] = await pair!.standby.adminQuery<{ r: boolean }>("SELECT pg_is_in_recovery() AS r");
    expect(primary!.r).to.equal(false);
    expect(standby!.r).to.equal(true);
  });

  it("shows on the standby, after waitForReplay(), a row written on the primary in a new database", async () => {
    const url = await pair!.primary.createDatabase("replica_rows");
    await withClient(url, async (c) => {
      await c.query("CREATE TABLE note (id int PRIMARY KEY, body text NOT NULL)");
      await c.query("INSERT INTO note VALUES (1, 'replicated')");
    });
    await pair!.waitForReplay();

    const standbyUrl = pair!.standbyUrl(url);
    expect(new URL(standbyUrl).port).to.equal(String(pair!.standby.port));
    expect(new URL(standbyUrl).pathname).to.equal(new URL(url).pathname);
    const rows = await withClient(
      standbyUrl,
      async (c) => (await c.query<{ id: number; body: string }>("SELECT id, body FROM note")).rows,
    );
    expect(rows).to.deep.equal([{ id: 1, body: "replicated" }]);
  });

  it("refuses writes on the standby", async () => {
    await pair!.waitForReplay(); // the test database exists there
    const error = await rejectionOf(withClient(pair!.standby.url, (c) => c.query("CREATE TABLE refused (id int)")));
    expect(error).to.have.property("code", "25006"); // read_only_sql_transaction
  });

  it("stop() ends both servers and removes both directories", async function () {
    this.timeout(30_000);
    const { primary, standby } = pair!;
    const pids = [postmasterPid(primary.dir), postmasterPid(standby.dir)];
    expect(pids.map(isRunning)).to.deep.equal([true, true]);

    await pair!.stop();

    expect(pids.map(isRunning)).to.deep.equal([false, false]);
    expect([existsSync(primary.dir), existsSync(standby.dir)]).to.deep.equal([false, false]);
    const refused = await rejectionOf(withClient(standby.url, async () => {}));
    expect(refused).to.be.instanceOf(Error);
  });
});
