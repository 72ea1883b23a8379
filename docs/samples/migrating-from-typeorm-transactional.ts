/**
 * The code samples of docs/migrating-from-typeorm-transactional.md, type-checked. Never run.
 * Each `#region` is quoted verbatim by the guide, with the `../../src/...` imports spelled as
 * the package's own import paths (docs/check-samples.mjs checks it).
 */
import "reflect-metadata";
import { notify, Order, User } from "./entities.js";

// #region after-setup
import { DataSource } from "typeorm";
import { configureSessions, defaultRegistry } from "../../src/index.js";

export const dataSource = new DataSource({ type: "postgres", url: process.env.DATABASE_URL, entities: [User, Order] });
configureSessions({ dataSource }); // at any time before the first block; nothing is patched

// Repositories that follow the current session, call by call: safe to share at module level.
export const users = defaultRegistry.getRepository(User);
export const orders = defaultRegistry.getRepository(Order);
// #endregion

// #region after-service
import { currentSession, Transactional } from "../../src/index.js";

export class OrderService {
  private readonly orders = defaultRegistry.getRepository(Order); // a scoped proxy, not a patched repository

  @Transactional()
  async place(userId: number, total: number): Promise<Order> {
    const order = await this.orders.save(this.orders.create({ userId, total }));
    currentSession().afterCommit(() => notify(`order ${order.id} placed`));
    return order;
  }
}
// #endregion

// #region after-functions
import { withTransaction } from "../../src/index.js";

export const deactivate = (id: number) =>
  withTransaction(() => users.update(id, { state: "inactive" }), { name: "deactivate" });

export async function audit(userId: number): Promise<void> {
  await withTransaction((s) => s.query("INSERT INTO audit (user_id) VALUES ($1)", [userId]), {
    propagation: "requiresNew",
    isolation: "READ COMMITTED",
  });
}
// #endregion

// #region propagation
import { UsesSession } from "../../src/index.js";

export class Billing {
  @Transactional() // REQUIRED, and NESTED: a SAVEPOINT when a transaction is already open
  async charge(orderId: number): Promise<void> {
    await orders.increment({ id: orderId }, "total", 100);
  }

  @Transactional({ savepoint: false }) // REQUIRED exactly: join the open transaction, no savepoint
  async addFee(orderId: number): Promise<void> {
    await orders.increment({ id: orderId }, "total", 5);
  }

  @Transactional({ propagation: "requiresNew" }) // REQUIRES_NEW: own session, own connection
  async log(message: string): Promise<void> {
    await currentSession().query("INSERT INTO audit (message) VALUES ($1)", [message]);
  }

  @UsesSession({ propagation: "mandatory" }) // MANDATORY: join the caller's session, check its transaction
  async settle(orderId: number): Promise<void> {
    if (!currentSession().inTransaction) throw new Error("settle() must run inside a transaction");
    await orders.delete(orderId);
  }

  @UsesSession() // SUPPORTS: the caller's transaction if there is one, else none
  async total(userId: number): Promise<number> {
    return orders.sum("total", { userId }).then((sum) => sum ?? 0);
  }

  @UsesSession({ propagation: "requiresNew" }) // NOT_SUPPORTED: own connection, no transaction
  async exportAll(): Promise<Order[]> {
    return currentSession().getRepository(Order).find();
  }

  @UsesSession() // NEVER: there is no option; check it
  async rebuild(): Promise<void> {
    if (currentSession().inTransaction) throw new Error("rebuild() must not run inside a transaction");
    await currentSession().query("REINDEX TABLE orders");
  }
}
// #endregion

// #region hooks
export async function placeOrder(userId: number, total: number): Promise<Order> {
  try {
    return await withTransaction(async (s) => {
      const order = await s.getRepository(Order).save({ userId, total });
      s.afterCommit(() => notify(`order ${order.id} placed`)); // runOnTransactionCommit
      s.afterRollback(() => notify(`order of user ${userId} not placed`)); // runOnTransactionRollback
      return order;
    });
  } finally {
    await notify("placeOrder finished"); // runOnTransactionComplete
  }
}
// #endregion

// #region data-sources
import { createSessionRegistry } from "../../src/index.js";

export const reportsDataSource = new DataSource({ type: "postgres", url: process.env.REPORTS_URL });
export const reports = createSessionRegistry({ dataSource: reportsDataSource, name: "reports" });

export class ReportJob {
  @Transactional({ registry: reports, isolation: "SERIALIZABLE", retry: 3 })
  async run(): Promise<void> {
    await currentSession(reports).query("REFRESH MATERIALIZED VIEW daily_totals");
  }
}
// #endregion

// #region testing
import { useTransactionalTests } from "../../src/testing/index.js";

describe("OrderService", () => {
  useTransactionalTests(); // each test in one transaction, rolled back after it

  it("places an order", async () => {
    const order = await new OrderService().place(1, 42);
    if ((await orders.countBy({ id: order.id })) !== 1) throw new Error("not stored");
  });
});
// #endregion
