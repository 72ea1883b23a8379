/**
 * The code samples of docs/for-sqlalchemy-users.md, type-checked. Never run. Each `#region` is
 * quoted verbatim by the guide, with the `../../src/...` imports spelled as the package's own
 * import paths (docs/check-samples.mjs checks it).
 */
import "reflect-metadata";
import { notify, Order, User } from "./entities.js";

// #region registry
import { createSessionRegistry } from "../../src/index.js";

// engine = create_engine(url); Session = scoped_session(sessionmaker(bind=engine))
export const db = createSessionRegistry({ url: "postgres://app@localhost/app", entities: [User, Order] });
// #endregion

// #region proxies
// Session.query(User) / Session.add(user): proxies that resolve to the current scope's session
export const users = db.getRepository(User);

export async function rename(id: number, email: string): Promise<void> {
  await users.update(id, { email });
}
// #endregion

// #region scope
export async function handle(job: { userId: number }): Promise<void> {
  await db.scope(async () => {
    const s = db.current(); // Session(): created on first call, the same one for the whole scope
    await s.getRepository(Order).findBy({ userId: job.userId });
    await rename(job.userId, "ada@example.com"); // same session, without passing it
  }); // Session.remove(): rolled back if needed, connection released, even when the body throws
}
// #endregion

// #region remove
export async function longJob(ids: number[]): Promise<void> {
  await db.scope(async () => {
    for (const id of ids) {
      await users.update(id, { state: "archived" });
      await db.remove(); // Session.remove(): the next call gets a fresh session
    }
  });
}
// #endregion

// #region transactions
export async function placeOrder(userId: number, total: number): Promise<Order> {
  // with Session.begin(): ... commits when the body returns, rolls back when it throws
  return db.withTransaction(async (s) => {
    const order = await s.getRepository(Order).save({ userId, total });
    try {
      // with s.begin_nested(): ... a SAVEPOINT; its failure undoes only its own work
      await db.withTransaction((inner) => inner.query("INSERT INTO audit (order_id) VALUES ($1)", [order.id]));
    } catch {
      // the order is still there
    }
    s.afterCommit(() => notify(`order ${order.id} placed`)); // event "after_commit"
    return order;
  });
}
// #endregion

// #region manual
export async function manual(): Promise<void> {
  await db.withSession(async (s) => {
    await s.begin(); // session.begin(); a second begin() would be a SAVEPOINT, like begin_nested()
    try {
      await s.query("UPDATE users SET state = 'checked'");
      await s.commit(); // session.commit()
    } catch (error) {
      await s.rollback(); // session.rollback()
      throw error;
    }
  });
}
// #endregion

// #region events
db.on("commit", ({ session, durationMs }) => console.log(`#${session.id} committed in ${durationMs} ms`));
db.on("error", ({ error }) => console.error(error)); // failures nobody could be thrown to
// #endregion

// #region express
import express from "express";
import { sessionMiddleware } from "../../src/integrations/express.js";

const app = express();
app.use(sessionMiddleware({ registry: db })); // teardown_appcontext + Session.remove(), per request
app.get("/users/:id", async (req, res) => {
  res.json(await users.findOneBy({ id: Number(req.params.id) }));
});
// #endregion

// #region shutdown
export async function shutdown(): Promise<void> {
  await db.drain({ timeoutMs: 10_000, destroy: true }); // engine.dispose(), after open sessions end
}
// #endregion
