import type { DataSource, EntityManager, QueryRunner } from "typeorm";
import { joinSession } from "../block/block.js";
import type { IsolationLevel } from "../block/options.js";
import { describe } from "../describe.js";
import { resolveOptions } from "../block/option-checks.js";
import { scopeOf, storage } from "../scope.js";
import { OWNER, type Session } from "../session/session.js";

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
 * in a frame of their own, so that concurrent calls do not share one; `preload` loads
 * through the session instead of the DataSource's own manager.
 */
function sessionManagerClass(dataSource: DataSource): Omit<ManagerKit, "customized"> {
  const Base = dataSource.manager.constructor as new (dataSource: DataSource, runner: QueryRunner) => EntityManager;
  type Method = (...args: unknown[]) => Promise<unknown>;
  /**
   * The manager's own `name` method, the one an override shadows. (A manager from a
   * customized `createEntityManager()` carries the overrides itself, so its own method
   * is its prototype's.)
   */
  const shadowed = (manager: SessionManager, name: string): Method => {
    const owner = (Object.hasOwn(manager, name) ? Object.getPrototypeOf(manager) : Base.prototype) as Record<
      string,
      Method
    >;
    return owner[name]!;
  };
  /** Run the manager's own `name` method in a frame of its own. */
  const inOwnFrame = (manager: SessionManager, name: string, args: unknown[]): Promise<unknown> => {
    const here = storage.getStore();
    return storage.run({ scope: scopeOf(here, manager[OWNER]), parent: here }, () =>
      shadowed(manager, name).apply(manager, args),
    );
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
  /**
   * What a session's manager does differently from TypeORM's own, one entry per method,
   * each saying why. (Audit of the rest: every other EntityManager, Repository,
   * TreeRepository and query-builder path runs on the manager's `queryRunner`.)
   */
  const overrides: Record<string, unknown> = {
    /** A transactional block on the session: a savepoint when nested, a turn of its own when concurrent. */
    transaction,
    /** May begin an implicit transaction: concurrent calls each get a frame, so that they do not share one. */
    save(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "save", args);
    },
    /** As `save`. */
    remove(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "remove", args);
    },
    /** As `save`. */
    softRemove(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "softRemove", args);
    },
    /** As `save`. */
    recover(this: SessionManager, ...args: unknown[]) {
      return inOwnFrame(this, "recover", args);
    },
    /**
     * TypeORM's `preload` loads the entity through the DataSource's own manager
     * (`this.connection.manager` in 0.3, `this.dataSource.manager` in 1.x), so on a
     * connection other than the session's: on PostgreSQL it does not see the session's
     * uncommitted rows, on SQLite it reads other sessions' uncommitted ones. The
     * manager's own `preload` (TypeORM's, or a subclass's that calls it) runs here on
     * this manager seen through a DataSource whose `manager` is this one, so that it
     * loads through the session whatever the TypeORM version. What it writes on `this`
     * lands on this manager. (`Repository.preload` calls the manager's.)
     */
    preload(this: SessionManager, ...args: unknown[]) {
      const dataSource = new Proxy(this.connection, {
        get: (target, key, receiver): unknown => (key === "manager" ? this : Reflect.get(target, key, receiver)),
      });
      const onSession = new Proxy(this, {
        get: (target, key, receiver): unknown =>
          key === "connection" || key === "dataSource" ? dataSource : Reflect.get(target, key, receiver),
      });
      return shadowed(this, "preload").apply(onSession, args);
    },
  };
  for (const [name, value] of Object.entries(overrides)) {
    Object.defineProperty(SessionManager.prototype, name, { value, writable: true, configurable: true });
  }
  return { Made: SessionManager, methods: overrides };
}
