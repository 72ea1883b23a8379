import type { DataSource, EntityManager, QueryRunner } from "typeorm";
import { joinSession } from "./block.js";
import type { IsolationLevel } from "./options.js";
import { describe, resolveOptions } from "./options.js";
import { scopeOf, storage } from "./scope.js";
import { OWNER, type Session } from "./session.js";

// A session's EntityManager: the subclass of the DataSource's own EntityManager class
// that keeps every call on the session.

type SessionManagerClass = new (dataSource: DataSource, runner: QueryRunner, session: Session) => EntityManager;

/** How the sessions of a DataSource get their EntityManagers, worked out once per DataSource. */
interface ManagerKit {
  /** The subclass of the DataSource's own EntityManager class. */
  readonly Made: SessionManagerClass;
  /** What it overrides. */
  readonly methods: Record<string, unknown>;
  /** Whether `createEntityManager` is overridden (on the instance or a subclass) rather than TypeORM's own. */
  readonly customized: boolean;
}

const managerKits = new WeakMap<DataSource, ManagerKit>();

/**
 * A session's EntityManager: an instance of {@link sessionManagerClass}, or, for a
 * DataSource whose `createEntityManager()` is customized, what that makes, given the
 * same methods.
 */
export function sessionManager(dataSource: DataSource, runner: QueryRunner, session: Session): EntityManager {
  let kit = managerKits.get(dataSource);
  if (kit === undefined) {
    kit = { ...sessionManagerClass(dataSource), customized: customizesManagers(dataSource) };
    managerKits.set(dataSource, kit);
  }
  if (!kit.customized) return new kit.Made(dataSource, runner, session);
  const manager = dataSource.createEntityManager(runner);
  Object.defineProperty(manager, OWNER, { value: session });
  for (const [name, value] of Object.entries(kit.methods)) {
    Object.defineProperty(manager, name, { value, writable: true, configurable: true });
  }
  return manager;
}

function customizesManagers(dataSource: DataSource): boolean {
  for (let o: object | null = dataSource; o !== null; o = Object.getPrototypeOf(o) as object | null) {
    if (Object.hasOwn(o, "createEntityManager")) return Object.getPrototypeOf(o) !== Object.prototype;
  }
  return false;
}

/**
 * The class of a session's EntityManager, a subclass of the DataSource's own, and the
 * methods it overrides. Its
 * `transaction()` is a transactional block on the session (the one core path: a
 * savepoint when nested, a turn of its own when concurrent), and the methods that may
 * begin an implicit transaction (`save`, `remove`, `softRemove`, `recover`) each run
 * in a frame of their own, so that concurrent calls do not share one.
 */
function sessionManagerClass(dataSource: DataSource): Omit<ManagerKit, "customized"> {
  const Base = dataSource.manager.constructor as new (dataSource: DataSource, runner: QueryRunner) => EntityManager;
  type Method = (...args: unknown[]) => Promise<unknown>;
  /**
   * Run the manager's own `name` method, the one the override shadows, in a frame of
   * its own. (A manager from a customized `createEntityManager()` carries the
   * overrides itself, so its own method is its prototype's.)
   */
  const inOwnFrame = (manager: SessionManager, name: string, args: unknown[]): Promise<unknown> => {
    const owner = (Object.hasOwn(manager, name) ? Object.getPrototypeOf(manager) : Base.prototype) as Record<
      string,
      Method
    >;
    const here = storage.getStore();
    return storage.run({ scope: scopeOf(here, manager[OWNER]), parent: here }, () => owner[name]!.apply(manager, args));
  };
  class SessionManager extends Base {
    readonly [OWNER]: Session;
    constructor(dataSource: DataSource, runner: QueryRunner, session: Session) {
      super(dataSource, runner);
      this[OWNER] = session;
    }
  }
  function transaction<T>(
    this: SessionManager,
    isolationOrFn: IsolationLevel | ((m: EntityManager) => Promise<T>),
    fn?: (m: EntityManager) => Promise<T>,
  ): Promise<T> {
    const body = typeof isolationOrFn === "function" ? isolationOrFn : fn;
    if (typeof body !== "function") {
      return Promise.reject(new TypeError(`Expected a transaction callback function, got ${describe(body)}`));
    }
    const session = this[OWNER];
    const here = storage.getStore();
    return joinSession(
      session,
      scopeOf(here, session),
      here,
      (s) => body(s.manager),
      resolveOptions(
        { isolation: typeof isolationOrFn === "string" ? isolationOrFn : undefined },
        "EntityManager.transaction",
        true,
      ),
    );
  }
  const methods: Record<string, unknown> = {
    transaction,
    save(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "save", args);
    },
    remove(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "remove", args);
    },
    softRemove(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "softRemove", args);
    },
    recover(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "recover", args);
    },
  };
  for (const [name, value] of Object.entries(methods)) {
    Object.defineProperty(SessionManager.prototype, name, { value, writable: true, configurable: true });
  }
  return { Made: SessionManager, methods };
}
