import { EntityManager, Repository } from "typeorm";
import type { DataSource, EntityTarget, ObjectLiteral } from "typeorm";
import type { SessionRegistry } from "./registry.js";
import { findScope, storage } from "../scope.js";
import type { Session } from "../session/session.js";

// The scoped proxies: `registry.manager` and `registry.getRepository(E)`, stand-ins that
// resolve, call by call, to the current scope's session. Frameworks and runtimes probe the
// objects they are handed (`then` when a promise resolves with one, Nest's lifecycle hooks,
// `constructor`, `toJSON`, `util.inspect`, symbols): those reads never reach a session, and
// give what a plain object would give.

/** Methods that return their result synchronously: outside a scope they throw rather than reject. */
const MANAGER_SYNC = new Set<PropertyKey>([
  "create",
  "merge",
  "getRepository",
  "getTreeRepository",
  "getMongoRepository",
  "withRepository",
  "getCustomRepository",
  "createQueryBuilder",
  "hasId",
  "getId",
]);
const REPOSITORY_SYNC = new Set<PropertyKey>(["create", "merge", "hasId", "getId", "createQueryBuilder"]);

/**
 * Names that frameworks and runtimes read to find out what an object is: never forwarded
 * to a session, not even inside a scope (a real repository has none of them either).
 */
const PROBES = new Set<PropertyKey>([
  "then",
  "onModuleInit",
  "onApplicationBootstrap",
  "onModuleDestroy",
  "beforeApplicationShutdown",
  "onApplicationShutdown",
  "toJSON",
  "inspect",
  "asymmetricMatch",
  "$$typeof",
  "nodeType",
  "@@__IMMUTABLE_ITERABLE__@@",
]);

/** What a proxy stands for. */
interface ProxyKind<T extends object> {
  /** The object of `session` that a call goes to. */
  resolve(session: Session): T;
  /** The prototype that tells methods from other members: the DataSource's own class when known. */
  prototype(dataSource: DataSource | undefined): object;
  /** Methods that return synchronously (they throw outside a scope instead of rejecting). */
  isSynchronous(property: PropertyKey): boolean;
  /**
   * Members that need no session, read from the DataSource (when the registry knows it);
   * `undefined` for every other member.
   */
  independent(property: PropertyKey, dataSource: DataSource | undefined): { value: unknown } | undefined;
  /** `extend(custom)`, for repositories. */
  extend?(custom: Readonly<Record<PropertyKey, unknown>>): object;
}

/** A method found on `prototype` or its ancestors, without running getters; `undefined` for getters. */
function memberOf(prototype: object | null, property: PropertyKey): { value: unknown; owner: object } | undefined {
  for (let p = prototype; p !== null; p = Object.getPrototypeOf(p) as object | null) {
    const descriptor = Object.getOwnPropertyDescriptor(p, property);
    if (descriptor !== undefined) return { value: descriptor.value, owner: p };
  }
  return undefined;
}

/**
 * A stand-in for an object of the current scope's session: method calls go to the object
 * `kind.resolve` gives for the session current at the time of the call; reads of other
 * members, to that object inside a scope, and give what a plain object would give outside
 * one. Session-independent members come from the DataSource.
 */
function scopedProxy<T extends object>(registry: SessionRegistry, kind: ProxyKind<T>): T {
  const methods = new Map<PropertyKey, (...args: unknown[]) => unknown>();
  const method = (property: PropertyKey): ((...args: unknown[]) => unknown) => {
    let forward = methods.get(property);
    if (forward === undefined) {
      const sync = kind.isSynchronous(property);
      forward = function (this: unknown, ...args: unknown[]): unknown {
        let target: Record<PropertyKey, (...a: unknown[]) => unknown>;
        try {
          target = kind.resolve(registry.current()) as unknown as typeof target;
        } catch (error) {
          if (sync) throw error;
          return Promise.reject(error);
        }
        return target[property]!(...args);
      };
      Object.defineProperty(forward, "name", { value: String(property) });
      methods.set(property, forward);
    }
    return forward;
  };
  return new Proxy(Object.create(null) as T, {
    get(_target, property) {
      if (typeof property === "symbol" || PROBES.has(property)) return undefined;
      const known = methods.get(property); // the hot path: a method seen before
      if (known !== undefined) return known;
      const dataSource = registry._knownDataSource();
      const independent = kind.independent(property, dataSource);
      if (independent !== undefined) return independent.value;
      if (property === "extend" && kind.extend !== undefined) return kind.extend.bind(kind);
      const member = memberOf(kind.prototype(dataSource), property);
      // `constructor`, and what every object has (`toString`, `hasOwnProperty`, ...): the prototype's own.
      if (property === "constructor" || member?.owner === Object.prototype) return member?.value;
      if (typeof member?.value === "function") return method(property);
      // Any other member belongs to the session's object: read it there inside a scope.
      if (findScope(storage.getStore(), registry) !== undefined) {
        return (kind.resolve(registry.current()) as Record<PropertyKey, unknown>)[property];
      }
      return undefined;
    },
    has(_target, property) {
      return !PROBES.has(property) && property in kind.prototype(registry._knownDataSource());
    },
    getPrototypeOf() {
      return kind.prototype(registry._knownDataSource());
    },
  });
}

/** `registry.manager`. @internal */
export function scopedManager(registry: SessionRegistry): EntityManager {
  return scopedProxy<EntityManager>(registry, {
    resolve: (session) => session.manager,
    // The DataSource's own EntityManager class (of the application's typeorm), else the library's.
    prototype: (dataSource) =>
      dataSource === undefined ? EntityManager.prototype : (Object.getPrototypeOf(dataSource.manager) as object),
    isSynchronous: (property) => MANAGER_SYNC.has(property),
    independent(property, dataSource) {
      if (property === "connection" || property === "dataSource") return { value: dataSource };
      if (property === "@instanceof") return { value: Symbol.for("EntityManager") };
      return undefined;
    },
  });
}

/** `registry.getRepository(target)`. @internal */
export function scopedRepository<E extends ObjectLiteral>(
  registry: SessionRegistry,
  target: EntityTarget<E>,
): Repository<E> {
  return repositoryProxy(registry, target, (session) => session.getRepository(target), {});
}

/**
 * A repository proxy; `custom` is what `extend()` added (a custom repository's methods and
 * values), `{}` for a plain one.
 */
function repositoryProxy<E extends ObjectLiteral>(
  registry: SessionRegistry,
  target: EntityTarget<E>,
  resolve: (session: Session) => Repository<E>,
  custom: Readonly<Record<PropertyKey, unknown>>,
): Repository<E> {
  const kind: ProxyKind<Repository<E>> = {
    resolve,
    prototype(dataSource) {
      // The repository class the DataSource's own EntityManager makes (TypeORM makes it without metadata).
      const base =
        dataSource === undefined
          ? Repository.prototype
          : (Object.getPrototypeOf(dataSource.manager.getRepository(target)) as object);
      return Object.keys(custom).length === 0 ? base : (Object.setPrototypeOf({ ...custom }, base) as object);
    },
    // A custom method may return synchronously or not: only `async function`s reject.
    isSynchronous: (property) =>
      Object.hasOwn(custom, property)
        ? (custom[property] as { constructor?: { name?: string } }).constructor?.name !== "AsyncFunction"
        : REPOSITORY_SYNC.has(property),
    independent(property, dataSource) {
      if (property === "target") {
        return { value: dataSource === undefined ? target : dataSource.manager.getRepository(target).target };
      }
      if (property === "metadata") {
        // TypeORM builds metadata in initialize(): until then there is none to give.
        return { value: dataSource?.hasMetadata(target) === true ? dataSource.getMetadata(target) : undefined };
      }
      if (property === "manager" && findScope(storage.getStore(), registry) === undefined) {
        return { value: registry.manager };
      }
      if (Object.hasOwn(custom, property) && typeof custom[property] !== "function") {
        return { value: custom[property] };
      }
      return undefined;
    },
    extend(more: Readonly<Record<PropertyKey, unknown>>) {
      return extendedProxy(registry, target, resolve, custom, more);
    },
  };
  return scopedProxy(registry, kind);
}

/**
 * `extend(more)` on a repository proxy: a proxy of the custom repository. On each
 * session the custom repository is made once (TypeORM's `extend` makes a class per
 * call), from that session's repository, so its methods run with `this` bound to it.
 */
function extendedProxy<E extends ObjectLiteral>(
  registry: SessionRegistry,
  target: EntityTarget<E>,
  resolve: (session: Session) => Repository<E>,
  custom: Readonly<Record<PropertyKey, unknown>>,
  more: Readonly<Record<PropertyKey, unknown>>,
): Repository<E> {
  if (typeof more !== "object" || more === null) {
    throw new TypeError(`Expected the custom repository to be an object of methods, got ${String(more)}`);
  }
  const made = new WeakMap<Repository<E>, Repository<E>>();
  const resolveExtended = (session: Session): Repository<E> => {
    const base = resolve(session);
    let extended = made.get(base);
    if (extended === undefined) {
      extended = base.extend(more);
      made.set(base, extended);
    }
    return extended;
  };
  return repositoryProxy(registry, target, resolveExtended, { ...custom, ...more });
}
