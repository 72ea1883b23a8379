import type { QueryRunner } from "typeorm";
import type { ConnectionGate } from "./gate.js";
import type { IsolationLevel } from "../block/options.js";
import type { TransactionMethod } from "./runner-view.js";
import type { Session, SessionHost } from "./session.js";

/**
 * The session's own transaction statements — BEGIN, COMMIT, ROLLBACK, SAVEPOINT and the
 * per-driver settings around them — sent through the driver runner's transaction
 * methods, so that TypeORM keeps its idea of the nesting and fires its transaction
 * events. Each goes through what the user assigned under that name on the runner view,
 * if anything (a spy, an APM wrapper; its call of the original comes back here), on a
 * view of the runner whose statements pass through a `query` the user assigned too.
 */
export class TransactionSql {
  readonly #session: Session;
  readonly #host: SessionHost;
  readonly #gate: ConnectionGate;
  /** Discard the connection after a failure that leaves it in an unknown state. */
  readonly #discard: (error: unknown) => Promise<void>;
  /** Calls of our own that wait to come back through a wrapper the user assigned on the view. */
  readonly #pending = new Set<PropertyKey>();
  /**
   * SQLite: the BEGIN on its way is of a transaction that may write, and goes out as
   * `BEGIN IMMEDIATE TRANSACTION` (see {@link #controlRunner}).
   */
  #immediate = false;
  /** The driver runner as our own transaction statements see it. */
  #controlView: QueryRunner | undefined;

  constructor(session: Session, host: SessionHost, gate: ConnectionGate, discard: (error: unknown) => Promise<void>) {
    this.#session = session;
    this.#host = host;
    this.#gate = gate;
    this.#discard = discard;
  }

  /** Whether a call of the view's `key` is ours, coming back through the user's wrapper. */
  returning(key: PropertyKey): boolean {
    return this.#pending.delete(key);
  }

  /** Begin the outermost transaction; on failure leave the connection as it was. */
  async begin(isolation: IsolationLevel | undefined, readOnly: boolean, invisible: boolean): Promise<void> {
    const family = this.#host.family;
    try {
      // MySQL sets the access mode of the next transaction, before it begins.
      if (readOnly && family === "mysql") await this.#own("SET TRANSACTION READ ONLY");
      // SQLite: a transaction that may write takes the write lock as it begins, so that
      // another process's writer makes it wait (busy timeout) rather than fail later. Not
      // the test's own transaction of useTransactionalTests(), which writes nothing itself.
      this.#immediate = !readOnly && !invisible && family === "sqlite";
      try {
        await this.call("startTransaction", [isolation]);
      } finally {
        this.#immediate = false;
      }
      if (readOnly) await this.readOnly(true);
    } catch (error) {
      await this.#undoBegin(readOnly && family === "mysql");
      throw error;
    }
  }

  /** PostgreSQL and SQLite: make the transaction read-only (SQLite: and undo that after it). */
  async readOnly(on: boolean): Promise<void> {
    const family = this.#host.family;
    if (family === "postgres" && on) await this.#own("SET TRANSACTION READ ONLY");
    if (family === "sqlite") await this.#own(`PRAGMA query_only = ${on ? "ON" : "OFF"}`);
  }

  /**
   * A BEGIN (or what followed it) failed: leave the connection as we found it. On
   * MySQL a `SET TRANSACTION READ ONLY` that went through would make the connection's
   * next transaction read-only: `accessModeSet` resets it (or the connection is discarded).
   */
  async #undoBegin(accessModeSet: boolean): Promise<void> {
    const real = this.#gate.real!;
    if (accessModeSet && !real.isTransactionActive) {
      try {
        await this.#own("SET TRANSACTION READ WRITE");
      } catch (error) {
        await this.#discard(error);
        return;
      }
    }
    if (real.isTransactionActive) {
      try {
        await this.call("rollbackTransaction");
      } catch (error) {
        // SQLite: the BEGIN itself failed (BEGIN IMMEDIATE answers SQLITE_BUSY once the busy
        // timeout has run out), so no transaction is open: the state we want.
        if (!(this.#host.family === "sqlite" && /no transaction is active/.test(String(error)))) {
          this.#host.reportError(this.#session, error);
          await this.#discard(error);
          return;
        }
      }
    }
    Object.assign(real, { isTransactionActive: false, transactionDepth: 0 });
  }

  /** Call the driver runner's `method` (a SAVEPOINT, COMMIT or ROLLBACK when nested). */
  async call(method: TransactionMethod, args: unknown[] = []): Promise<void> {
    const view = this.#gate.view!;
    const assigned = view.assigned(method);
    if (assigned === undefined) return this.driverCall(method, args);
    this.#pending.add(method);
    try {
      await assigned.apply(view.runner, args);
    } finally {
      this.#pending.delete(method);
    }
  }

  /** A statement of our own (SET TRANSACTION READ ONLY...), sent as {@link call} sends them. */
  #own(sql: string): Promise<unknown> {
    return this.#controlRunner().query(sql);
  }

  /** The driver runner's own `method`, with our control view as `this`. */
  driverCall(method: TransactionMethod, args: unknown[]): Promise<void> {
    const call = Reflect.get(this.#gate.real!, method) as (...args: unknown[]) => Promise<void>;
    return call.apply(this.#controlRunner(), args);
  }

  #controlRunner(): QueryRunner {
    if (this.#controlView !== undefined) return this.#controlView;
    const gate = this.#gate;
    const query = (sql: string, parameters?: unknown[], structured?: boolean): Promise<unknown> => {
      // TypeORM's SQLite runners begin with a deferred BEGIN, which takes no lock: a transaction
      // that reads and then writes must upgrade, and SQLite answers SQLITE_BUSY at once, without
      // waiting for its busy timeout, when another connection wrote in between.
      if (this.#immediate && sql === "BEGIN TRANSACTION") {
        this.#immediate = false;
        sql = "BEGIN IMMEDIATE TRANSACTION";
      }
      const view = gate.view!;
      const assigned = view.assigned("query");
      if (assigned === undefined) return gate.control(sql, parameters, structured === true);
      this.#pending.add("query");
      return Promise.resolve(assigned.call(view.runner, sql, parameters, structured)).finally(() =>
        this.#pending.delete("query"),
      );
    };
    this.#controlView = new Proxy(gate.real!, {
      get: (real, key, view): unknown => (key === "query" ? query : Reflect.get(real, key, view)),
    });
    return this.#controlView;
  }
}
