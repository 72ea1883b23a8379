// Run by spec/pg-queue.spec.ts as `node --throw-deprecation pg-promise-all.js <url> <mode>`:
// `Promise.all` of statements inside one session on PostgreSQL. node-postgres 8.19+ warns
// (a DeprecationWarning, thrown here) when a client is handed a query while one is in flight.
import "reflect-metadata";
import { DataSource } from "typeorm";
import { createSessionRegistry, type Session } from "../../src/index.js";
import { Note } from "./entities.js";
import { ENTITIES } from "./sqlite.js";

const [url, mode] = process.argv.slice(2);
const dataSource = new DataSource({ type: "postgres", url, entities: ENTITIES, extra: { max: 2 } });
const db = createSessionRegistry({ name: "promise-all", dataSource });

const together = (s: Session, tag: string) => {
  const repo = s.getRepository(Note);
  return Promise.all([
    repo.insert({ body: `${tag} a` }),
    repo.insert({ body: `${tag} b` }),
    s.query("SELECT pg_sleep(0.05)"),
  ]);
};

if (mode === "transaction") {
  await db.withTransaction((s) => together(s, "transaction"));
} else if (mode === "session") {
  await db.withSession((s) => together(s, "session"));
} else if (mode === "bypass") {
  // The same statements on TypeORM's own runner, around the session: what the queue prevents.
  await dataSource.initialize();
  const runner = dataSource.createQueryRunner();
  try {
    await runner.startTransaction();
    await Promise.all([
      runner.query(`INSERT INTO notes (body) VALUES ('bypass a')`),
      runner.query(`INSERT INTO notes (body) VALUES ('bypass b')`),
      runner.query("SELECT pg_sleep(0.05)"),
    ]);
    await runner.commitTransaction();
  } finally {
    await runner.release();
  }
} else {
  throw new Error(`unknown mode ${String(mode)}; expected transaction, session or bypass`);
}
await db.drain({ destroy: true });
if (dataSource.isInitialized) await dataSource.destroy();
