import type { QueryRunner } from "typeorm";
import type { IsolationLevel } from "../block/options.js";
import type { Session } from "./session.js";

/** On a session's runner view and EntityManager: the session they belong to. */
export const OWNER = Symbol("typeorm-scoped-session.owner");

/** One of the driver runner's transaction methods. */
export type TransactionMethod = "startTransaction" | "commitTransaction" | "rollbackTransaction";

/** A function assigned on the view by its user (a spy, an APM agent's wrapper). */
export type Assigned = (...args: unknown[]) => unknown;

/** What a runner view hands its calls to: the session's connection gate and transactions. */
export interface ViewTarget {
  readonly session: Session;
  /** A statement TypeORM (or the user) sends through the view. */
  viewQuery(sql: string, parameters: unknown[] | undefined, structured: boolean): Promise<unknown>;
  viewStream(args: Parameters<QueryRunner["stream"]>): Promise<unknown>;
  viewConnect(): Promise<unknown>;
  /** `startTransaction`, `commitTransaction` or `rollbackTransaction` called on the view. */
  viewTransaction(method: TransactionMethod, isolation?: IsolationLevel): Promise<void>;
  viewTransactionActive(): boolean;
}

const TARGET = Symbol("typeorm-scoped-session.view-target");
type View = QueryRunner & { [TARGET]: ViewTarget };

/**
 * The entry points of every runner view, shared by all of them: each finds its target
 * through {@link TARGET}. Everything TypeORM does with the view is gated, counted and
 * scoped; reads fall through to the driver's runner; nothing of TypeORM is patched.
 */
const ENTRIES = new Map<PropertyKey, PropertyDescriptor>(
  Object.entries({
    query: {
      value(this: View, sql: string, parameters?: unknown[], structured?: boolean) {
        return this[TARGET].viewQuery(sql, parameters, structured === true);
      },
    },
    stream: {
      value(this: View, ...args: Parameters<QueryRunner["stream"]>) {
        return this[TARGET].viewStream(args);
      },
    },
    connect: {
      value(this: View) {
        return this[TARGET].viewConnect();
      },
    },
    release: { value: () => Promise.resolve() },
    startTransaction: {
      value(this: View, isolation?: IsolationLevel) {
        return this[TARGET].viewTransaction("startTransaction", isolation);
      },
    },
    commitTransaction: {
      value(this: View) {
        return this[TARGET].viewTransaction("commitTransaction");
      },
    },
    rollbackTransaction: {
      value(this: View) {
        return this[TARGET].viewTransaction("rollbackTransaction");
      },
    },
    isTransactionActive: {
      get(this: View) {
        return this[TARGET].viewTransactionActive();
      },
    },
    isReleased: { get: () => false },
  } satisfies PropertyDescriptorMap),
);

/**
 * The view is a proxy over the driver's runner, which stays an ordinary object: it
 * answers with {@link ENTRIES}, its session and its own broadcaster, and reads
 * everything else on the runner. (A view made by inheriting from the runner would
 * turn the runner into a prototype: a one-of-a-kind, slow shape for all of TypeORM's
 * code that runs on it, made slower still by every write to it.) What TypeORM writes
 * through the view goes to the runner, except on SQLite's one shared runner, where it
 * stays with the session: `data`, and the state that `release()` resets on a runner
 * of one's own (`loadedTables`, `sqlInMemory`), start fresh for each session. Methods
 * that users assign on the view (spies, wrappers of APM agents) stay with the view and
 * are what it answers with from then on.
 */
export class RunnerView implements ProxyHandler<QueryRunner> {
  readonly #target: ViewTarget;
  readonly #shared: boolean;
  readonly #own = new Map<PropertyKey, unknown>();
  /** The view itself: the proxy this handler answers for. */
  readonly runner: QueryRunner;
  /** The broadcaster of entity events for this view. */
  readonly #broadcaster: unknown;

  /**
   * @param real - the driver's runner
   * @param shared - the one runner of a single-connection driver, which many sessions use
   */
  constructor(real: QueryRunner, target: ViewTarget, shared: boolean) {
    this.#target = target;
    this.#shared = shared;
    if (shared) {
      const SqlInMemory = (real as unknown as { sqlInMemory: object }).sqlInMemory.constructor as new () => unknown;
      this.#own.set("data", {});
      this.#own.set("loadedTables", []);
      this.#own.set("sqlInMemory", new SqlInMemory());
      this.#own.set("sqlMemoryMode", false);
    }
    this.runner = new Proxy(real, this);
    // Entity events (beforeInsert, afterLoad...) are broadcast through the runner: give them this
    // session's runner and manager, not whichever session used the shared SQLite runner last.
    const Broadcaster = real.broadcaster.constructor as new (runner: QueryRunner) => unknown;
    this.#broadcaster = new Broadcaster(this.runner);
  }

  /** The method the user assigned under `key`, if any. */
  assigned(key: string): Assigned | undefined {
    const value = this.#own.get(key);
    return typeof value === "function" ? (value as Assigned) : undefined;
  }

  #keeps(key: PropertyKey): boolean {
    return this.#shared || ENTRIES.get(key)?.value !== undefined;
  }

  get(real: QueryRunner, key: PropertyKey, view: unknown): unknown {
    if (key === TARGET) return this.#target;
    if (key === OWNER) return this.#target.session;
    if (key === "broadcaster") return this.#broadcaster;
    const entry = ENTRIES.get(key);
    if (entry?.get !== undefined) return entry.get.call(view);
    const own = this.#own;
    if (own.has(key)) return own.get(key);
    if (entry !== undefined) return entry.value;
    return Reflect.get(real, key, view);
  }

  set(real: QueryRunner, key: PropertyKey, value: unknown): boolean {
    if (!this.#keeps(key)) return Reflect.set(real, key, value);
    this.#own.set(key, value);
    return true;
  }

  defineProperty(real: QueryRunner, key: PropertyKey, descriptor: PropertyDescriptor): boolean {
    if (!this.#keeps(key) || !("value" in descriptor)) return Reflect.defineProperty(real, key, descriptor);
    this.#own.set(key, descriptor.value);
    return true;
  }

  deleteProperty(real: QueryRunner, key: PropertyKey): boolean {
    if (this.#own.delete(key)) return true;
    return Reflect.deleteProperty(real, key);
  }

  getOwnPropertyDescriptor(real: QueryRunner, key: PropertyKey): PropertyDescriptor | undefined {
    if (!this.#own.has(key)) return Reflect.getOwnPropertyDescriptor(real, key);
    return { value: this.#own.get(key), writable: true, enumerable: true, configurable: true };
  }
}
