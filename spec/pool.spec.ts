// No pool deadlock where plain TypeORM has none: requests that mix the request's session with
// `dataSource.manager` (what @InjectRepository repositories, auth strategies and pagination
// libraries use) on a pool of N connections, 4×N at once, on PostgreSQL.
import { expect } from "chai";
import express from "express";
import { DataSource } from "typeorm";
import { createSessionRegistry, type SessionRegistry } from "../src/index.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { connectionsInUse } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { idle, listen, send, within } from "./support/http.js";
import { freshDatabase, pgServer } from "./support/postgres-hooks.js";
import { deferred } from "./support/util.js";
import { ENTITIES } from "./support/sqlite.js";

const POOL = 4;
const REQUESTS = 4 * POOL;
// Fewer transactional requests than connections: a transaction pins its connection until it
// ends, so N of them each waiting for a second connection would deadlock plain TypeORM too.
const TRANSACTIONAL = POOL - 1;

describe("pool: requests mixing the session and dataSource.manager [postgres]", () => {
  let dataSource: DataSource;
  let reg: SessionRegistry;
  before(async function () {
    if (pgServer() === undefined) this.skip();
    const url = await freshDatabase("pool");
    dataSource = new DataSource({ type: "postgres", url, entities: ENTITIES, synchronize: true, extra: { max: POOL } });
    await dataSource.initialize();
    reg = createSessionRegistry({ name: "pool", dataSource });
  });
  after(async () => {
    if (dataSource?.isInitialized) await dataSource.destroy();
  });

  it(`${REQUESTS} concurrent requests on a pool of ${POOL} all complete`, async () => {
    const notes = reg.getRepository(Note);
    // Every request has used its session before any goes on: with sessions that kept their
    // connection from first use to the end of the request, the pool would be empty here for good.
    let arrived = 0;
    const everyone = deferred();
    const app = express();
    app.use(sessionMiddleware({ registry: reg }));
    app.get("/mixed/:n", async (req, res) => {
      const n = Number(req.params.n);
      await notes.count();
      if (++arrived === REQUESTS) everyone.resolve();
      await everyone.promise;
      const outside = await dataSource.manager.count(Note);
      if (n < TRANSACTIONAL) {
        await reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: `tx ${n}` });
          await dataSource.manager.count(Note);
        });
      }
      res.json({ n, outside, inside: await notes.count() });
    });
    const server = await listen(app);
    try {
      const replies = await within(
        Promise.all(Array.from({ length: REQUESTS }, (_, n) => send(server.port, `/mixed/${n}`))),
        `${REQUESTS} requests on a pool of ${POOL}`,
        20_000,
      );
      expect(replies.map((r) => r.status)).to.deep.equal(Array(REQUESTS).fill(200));
      await idle(reg);
      expect(connectionsInUse(dataSource)).to.equal(0);
      expect(await dataSource.manager.count(Note)).to.equal(TRANSACTIONAL);
    } finally {
      await server.close();
    }
  });
});
