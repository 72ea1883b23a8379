import type { QueryRunner } from "typeorm";
import { TransactionNotActiveError } from "../../errors.js";
import type { ConnectionGate } from "./gate.js";
import type { Handle, Level, LevelStack } from "./levels.js";
import type { IsolationLevel } from "../block/options.js";
import type { TransactionMethod, ViewTarget } from "./runner-view.js";
import { isWithin, storage } from "../scope.js";
import type { Session, SessionHost } from "./session.js";
import type { SessionState } from "./state.js";
import type { Transactions } from "./transactions.js";

/** A begin through the runner view, as `manager.transaction()` and TypeORM's implicit transactions do. */
const VIEW_BEGIN = { readOnly: false, durable: false, savepoint: true, name: undefined } as const;

/**
 * What a session's runner view does with the calls TypeORM (or the user) makes on it:
 * statements go through the connection gate, transaction methods open and end levels.
 */
export class ViewCalls implements ViewTarget {
  readonly session: Session;
  readonly #host: SessionHost;
  readonly #state: SessionState;
  readonly #stack: LevelStack;
  readonly #gate: ConnectionGate;
  readonly #tx: Transactions;
  /** Levels TypeORM began through the runner view, to be ended by its commit/rollback calls. */
  #viewLevels: Level[] = [];

  constructor(
    session: Session,
    host: SessionHost,
    parts: { state: SessionState; stack: LevelStack; gate: ConnectionGate; tx: Transactions },
  ) {
    this.session = session;
    this.#host = host;
    this.#state = parts.state;
    this.#stack = parts.stack;
    this.#gate = parts.gate;
    this.#tx = parts.tx;
  }

  viewQuery(sql: string, parameters: unknown[] | undefined, structured: boolean): Promise<unknown> {
    // Our own BEGIN/COMMIT... coming back through a wrapper the user assigned.
    if (this.#tx.sql.returning("query")) return this.#gate.control(sql, parameters, structured);
    return this.#gate.statement(sql, parameters, structured);
  }

  async viewStream(args: Parameters<QueryRunner["stream"]>): Promise<unknown> {
    // A stream reads from its connection until it ends: the session keeps it until it closes.
    if (this.#host.lease === undefined) await this.#gate.hold(storage.getStore());
    return this.#gate.real!.stream(...args);
  }

  async viewConnect(): Promise<unknown> {
    // Asked for the connection itself (LISTEN, COPY, a driver API): the session keeps it until it closes.
    this.#state.assertUsable(storage.getStore());
    this.#gate.pinned = true;
    await this.#gate.connect();
    return this.#gate.real!.connect();
  }

  viewTransaction(method: TransactionMethod, isolation?: IsolationLevel): Promise<void> {
    if (this.#tx.sql.returning(method))
      return this.#tx.sql.driverCall(method, method === "startTransaction" ? [isolation] : []);
    return method === "startTransaction" ? this.#viewBegin(isolation) : this.#viewEnd(method === "commitTransaction");
  }

  viewTransactionActive(): boolean {
    return this.#stack.visible > 0 && this.#state.mayRun(storage.getStore());
  }

  /**
   * TypeORM itself begins a transaction through the runner (`manager.transaction()`,
   * an implicit one around `save()`): it becomes a level, ended by the matching
   * commit/rollback through the runner. A begin that failed leaves nothing behind for
   * TypeORM's rollback to undo.
   */
  async #viewBegin(isolation: IsolationLevel | undefined): Promise<void> {
    const handle = (await this.#tx.enter(storage.getStore(), { ...VIEW_BEGIN, isolation })) as Handle;
    this.#viewLevels.push(handle.level);
  }

  async #viewEnd(commit: boolean): Promise<void> {
    const frame = storage.getStore();
    this.#viewLevels = this.#viewLevels.filter((l) => l.ended === undefined);
    const level = this.#viewLevels.at(-1);
    if (level === undefined || !(level.owner === undefined || isWithin(frame, level.owner))) {
      throw new TransactionNotActiveError(String(this.session), commit ? "commitTransaction" : "rollbackTransaction");
    }
    this.#viewLevels.pop();
    const outcome = await this.#tx.exit({ level, joined: false } satisfies Handle, commit);
    await this.#state.runCallbacks(outcome.callbacks);
    if ("error" in outcome) throw outcome.error;
  }
}
