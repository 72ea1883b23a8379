/**
 * The "before" side of docs/migrating-from-typeorm-transactional.md: the same code written with
 * typeorm-transactional, type-checked against its real typings. Never run.
 */
import "reflect-metadata";
import { notify, Order, User } from "./entities.js";

// #region before-setup
import { DataSource } from "typeorm";
import { addTransactionalDataSource, initializeTransactionalContext, StorageDriver } from "typeorm-transactional";

initializeTransactionalContext({ storageDriver: StorageDriver.ASYNC_LOCAL_STORAGE }); // before anything else
export const dataSource = addTransactionalDataSource(
  new DataSource({ type: "postgres", url: process.env.DATABASE_URL, entities: [User, Order] }),
);
// #endregion

// #region before-service
import { runOnTransactionCommit, Transactional } from "typeorm-transactional";

export class OrderService {
  private readonly orders = dataSource.getRepository(Order); // patched: follows the transaction

  @Transactional()
  async place(userId: number, total: number): Promise<Order> {
    const order = await this.orders.save(this.orders.create({ userId, total }));
    runOnTransactionCommit(() => void notify(`order ${order.id} placed`));
    return order;
  }
}
// #endregion

// #region before-functions
import { IsolationLevel, Propagation, runInTransaction, wrapInTransaction } from "typeorm-transactional";

export const deactivate = wrapInTransaction(async (id: number) => {
  await dataSource.getRepository(User).update(id, { state: "inactive" });
});

export async function audit(userId: number): Promise<void> {
  await runInTransaction(() => dataSource.query("INSERT INTO audit (user_id) VALUES ($1)", [userId]), {
    propagation: Propagation.REQUIRES_NEW,
    isolationLevel: IsolationLevel.READ_COMMITTED,
  });
}
// #endregion
