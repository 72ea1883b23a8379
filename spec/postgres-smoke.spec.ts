import { expect } from "chai";
import type { DataSource } from "typeorm";
import { createSessionRegistry, type SessionRegistry } from "../src/index.js";
import { Account, Note } from "./support/entities.js";
import { freshDatabase, pgDataSource, pgServer, type PgServer } from "./support/postgres-hooks.js";
import { rejectionOf } from "./support/util.js";

const ENTITIES = [Note, Account];

class Boom extends Error {}

describe("postgres smoke", () => {
  let pg: PgServer;
  let url: string;
  let ds: DataSource;
  let reg: SessionRegistry;

  before(async function () {
    const server = pgServer();
    if (!server) this.skip();
    pg = server;
    url = await freshDatabase("smoke");
    ds = pgDataSource(url, ENTITIES);
    reg = createSessionRegistry({ name: "pg-smoke", dataSource: ds });
  });

  after(async () => {
    if (ds?.isInitialized) await ds.destroy();
  });

  it("commits a transaction, rolls back a failed one, and leaves no backend idle in transaction", async () => {
    await reg.withTransaction(async (s) => {
      await s.getRepository(Note).insert({ body: "kept", block: 1 });
    });
    const error = await rejectionOf(
      reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "undone", block: 2 });
        throw new Boom("roll back");
      }),
    );
    expect(error).to.be.instanceOf(Boom);

    const notes = await reg.withSession((s) => s.getRepository(Note).find({ order: { id: "ASC" } }));
    expect(notes.map((n) => n.body)).to.deep.equal(["kept"]);

    const database = new URL(url).pathname.slice(1);
    const stuck = await pg.adminQuery(
      "SELECT pid, state, query FROM pg_stat_activity WHERE datname = $1 AND state LIKE 'idle in transaction%'",
      [database],
    );
    expect(stuck).to.deep.equal([]);
    // The pool's connections are still open (idle), so the check above looked at real backends.
    const open = await pg.adminQuery<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1",
      [database],
    );
    expect(open[0]!.n).to.be.greaterThan(0);

    await ds.destroy();
    expect(ds.isInitialized).to.equal(false);
  });
});
