import type { DataSource, EntityManager, EntityTarget, ObjectLiteral, Repository } from "typeorm";
import {
  NoActiveSessionError,
  RegistryBusyError,
  RegistryNotConfiguredError,
  SessionClosedError,
} from "../../errors.js";
import { runBlock, scopeSession, type SessionBody } from "../block/block.js";
import { openExplicit, openScope } from "../block/open.js";
import { describe } from "../describe.js";
import { SessionEvents, type SessionEventName, type SessionListener } from "./events.js";
import { DataSourceHost, type RegistryHost } from "./host.js";
import { initializeOnce, trackInitialization } from "./initialization.js";
import type { OpenOptions, SessionOptions } from "../block/options.js";
import { SessionPool, type DrainOptions, type DrainResult, type SessionStats } from "./pool.js";
import { scopedManager, scopedRepository } from "./proxies.js";
import { markRegistry } from "./registry-brand.js";
import {
  dataSourceInput,
  type DataSourceInput,
  expectOptionsObject,
  hostSettings,
  type HostSettings,
  leakDetection,
  type SessionRegistryOptions,
} from "./registry-options.js";
import { findScope, type Scope, storage } from "../scope.js";
import type { Session, SessionHost } from "../session/session.js";
import { isDataSource, typeormCopies } from "../driver/typeorm.js";

let registries = 0;

/**
 * A scoped session registry: the Node counterpart of SQLAlchemy's
 * `scoped_session`. Each unit of work (a block, a request, a job) gets its own
 * {@link Session}, found by any code running inside it through
 * {@link SessionRegistry.current}.
 *
 * @example
 * ```ts
 * const db = createSessionRegistry({ url: "sqlite:./app.db", entities: [User] });
 * const users = db.getRepository(User); // safe to share: resolves per scope
 * await db.withSession(() => users.findOneBy({ id: 1 }));
 * ```
 */
export class SessionRegistry {
  /** Label used in errors, events and leak reports. */
  readonly name: string;

  #input: DataSourceInput | undefined;
  #settings: HostSettings;
  #host: DataSourceHost | undefined;
  #initializing: Promise<SessionHost> | undefined;
  readonly #events: SessionEvents;
  readonly #pool: SessionPool;
  readonly #repositories = new Map<EntityTarget<ObjectLiteral>, object>();
  #manager: EntityManager | undefined;
  /** @internal The scope of useTransactionalTests() (see test-seam.ts), which code outside every block joins. */
  _testScope: Scope | undefined;

  /**
   * Create a registry; {@link createSessionRegistry} does the same and reads better.
   *
   * @param options - `dataSource` (or a function returning one), or `url` plus DataSource options;
   *   `name`, `leakDetectionMs`, `tracing`, `replicas`; without a data source, call {@link configure} before first use
   * @throws TypeError/RangeError on invalid options
   * @example
   * ```ts
   * const analytics = new SessionRegistry({ url: "postgres://app@localhost/analytics", name: "analytics" });
   * ```
   */
  constructor(options: SessionRegistryOptions = {}) {
    expectOptionsObject(options);
    if (options.name !== undefined && typeof options.name !== "string") {
      throw new TypeError(`Expected \`name\` to be a string, got ${describe(options.name)}`);
    }
    this.name = options.name ?? `registry-${++registries}`;
    markRegistry(this);
    this.#events = new SessionEvents(this.name);
    this.#pool = new SessionPool(this.name, this.#events, leakDetection(options));
    this.#settings = hostSettings(options);
    this.#input = dataSourceInput(options);
    // From now on the application's own initialize() and this registry's share one initialization.
    if (typeof this.#input === "object") trackInitialization(this.#input);
  }

  /** The DataSource, once the registry has one and it is initialized. */
  get dataSource(): DataSource | undefined {
    return this.#host?.dataSource;
  }

  /**
   * @internal The DataSource if the registry knows it without waiting: once ready, or
   * given as an object (`dataSource: ds` or `url`), initialized or not.
   */
  _knownDataSource(): DataSource | undefined {
    return this.#host?.dataSource ?? (typeof this.#input === "object" ? this.#input : undefined);
  }

  /**
   * Initialize the DataSource now rather than on first use: call it at start-up, before
   * serving requests, to fail fast on a database that cannot be reached or a schema that
   * does not match. Resolves at once when the registry is ready. The initialization is the
   * one every registry using this DataSource shares, and the one the application's own
   * `dataSource.initialize()` joins when the registry saw the DataSource first; a failed
   * one is tried again by the next call or block.
   *
   * @returns a promise that resolves once the DataSource is initialized
   * @throws {@link RegistryNotConfiguredError} (as a rejection) while the registry has no data source
   * @throws the initialization's error (as a rejection): TypeORM's, the driver's, or a
   *   `TypeError` when `dataSource` (or what its function returned) is not a DataSource
   * @example
   * ```ts
   * export const db = createSessionRegistry({ dataSource: AppDataSource });
   *
   * async function main() {
   *   await db.ready(); // connects, runs migrationsRun/synchronize; throws if the database is down
   *   app.listen(3000);
   * }
   * ```
   */
  async ready(): Promise<void> {
    const ready = this._ready();
    if (ready instanceof Promise) await ready;
  }

  /**
   * Late binding: give the registry its data source (or a new one). Like an
   * application factory that creates the engine after import. The DataSource is
   * initialized on first use, not here. Also opens a registry closed by
   * {@link drain} again. {@link configureSessions} does this for {@link defaultRegistry}.
   *
   * @param options - `dataSource` (or a function returning one), or `url` plus DataSource options;
   *   `leakDetectionMs`, `tracing`, `replicas`. `name` is fixed when the registry is created and is not changed here
   * @throws TypeError/RangeError on invalid options; with `url`, TypeORM's error when the driver
   *   package is not installed
   * @throws {@link RegistryBusyError} while sessions of this registry are open
   * @example
   * ```ts
   * db.configure({ dataSource: () => createDataSource(loadConfig()) });
   * ```
   */
  configure(options: SessionRegistryOptions): void {
    expectOptionsObject(options);
    if (this.#pool.active > 0) throw new RegistryBusyError(this.name, this.#pool.active);
    const leakDetectionMs = leakDetection(options);
    const settings = hostSettings(options);
    this.#input = dataSourceInput(options);
    this.#settings = settings;
    if (typeof this.#input === "object") trackInitialization(this.#input);
    this.#pool.reopen(leakDetectionMs);
    this.#host = undefined;
    this.#initializing = undefined;
  }

  /**
   * Run `fn` with a session of this registry: {@link withSession} bound to this
   * registry (unless `options.registry` names another one).
   *
   * @param fn - the body; receives the session
   * @param options - see {@link SessionOptions}
   * @returns what `fn` returns, once the session it opened (if any) is removed
   * @throws TypeError/RangeError (as a rejection) when `fn` is not a function or on invalid options
   * @throws {@link PropagationError}, {@link NoActiveSessionError}, {@link SessionClosedError},
   *   {@link SessionTimeoutError}, {@link RegistryNotConfiguredError}, {@link RegistryClosedError}
   *   (as rejections) as {@link withSession} does
   * @example
   * ```ts
   * const user = await db.withSession((s) => s.getRepository(User).findOneBy({ id }));
   * ```
   */
  withSession<T>(fn: SessionBody<T>, options?: SessionOptions): Promise<T> {
    return runBlock(this, fn, options, false);
  }

  /**
   * Run `fn` in a transaction of this registry: {@link withTransaction} bound to this
   * registry (unless `options.registry` names another one).
   *
   * @param fn - the body; receives the session
   * @param options - see {@link SessionOptions}
   * @returns what `fn` returns, after the COMMIT and the `afterCommit` callbacks
   * @throws TypeError/RangeError (as a rejection) when `fn` is not a function or on invalid options
   * @throws {@link PropagationError} (as a rejection) for `durable`, `isolation` or `readOnly` inside an
   *   open transaction
   * @throws {@link NoActiveSessionError}, {@link SessionClosedError}, {@link SessionTimeoutError},
   *   {@link RegistryNotConfiguredError}, {@link RegistryClosedError} (as rejections) as {@link withSession} does
   * @example
   * ```ts
   * await db.withTransaction(async (s) => { await s.getRepository(Order).save(order) });
   * ```
   */
  withTransaction<T>(fn: SessionBody<T>, options?: SessionOptions): Promise<T> {
    return runBlock(this, fn, options, true);
  }

  /**
   * Run `fn` in a new scope whose session is created on first use of
   * {@link current} (or the proxies, or a joining block) and removed when `fn`
   * settles: a scope that never touches the database takes no connection. The
   * middleware opens one per request with it.
   *
   * @param fn - the scope's body; takes no arguments (code inside finds the session with {@link current})
   * @returns `fn`'s result, as a promise that settles after the scope's session (if any) is removed
   * @throws TypeError (as a rejection) when `fn` is not a function
   * @throws {@link RegistryNotConfiguredError} (as a rejection) while the registry has no data source
   * @example
   * ```ts
   * // one unit of work per job: a connection is taken only if handle() queries
   * for await (const job of queue) await db.scope(() => handle(job));
   * ```
   */
  scope<T>(fn: () => T | Promise<T>): Promise<T> {
    return openScope(this, fn);
  }

  /**
   * The session of the current scope, created on first call inside a
   * {@link scope}. Throws synchronously.
   *
   * @returns the session of the innermost scope of this registry
   * @throws {@link NoActiveSessionError} outside any scope of this registry
   * @throws {@link SessionClosedError} when the scope's block has ended or is committing
   * @throws {@link RegistryClosedError} when it has to create the scope's session while the registry drains
   * @example
   * ```ts
   * async function audit(msg: string) { await db.current().query("INSERT INTO audit(msg) VALUES (?)", [msg]); }
   * ```
   */
  current(): Session {
    const scope = findScope(storage.getStore(), this);
    if (scope === undefined) throw new NoActiveSessionError(this.name);
    // Inside scope() and a request's scope: the session is created on first use.
    if (scope.session === undefined || scope.over !== undefined) scopeSession(scope, this._host(), undefined);
    return this.tryCurrent()!;
  }

  /**
   * The session of the current scope if there is one, else `undefined`. Never
   * creates one. Throws synchronously.
   *
   * @returns the session of the innermost scope of this registry, or `undefined` outside any
   *   scope (or inside a {@link scope} whose session has not been created yet)
   * @throws {@link SessionClosedError} when the scope's session is closing or closed
   * @example
   * ```ts
   * // after the caller's transaction commits (at once outside one), or now without a session
   * const s = db.tryCurrent();
   * if (s !== undefined) s.afterCommit(() => cache.delete(key));
   * else cache.delete(key);
   * ```
   */
  tryCurrent(): Session | undefined {
    const frame = storage.getStore();
    const scope = findScope(frame, this);
    if (scope === undefined) return undefined;
    const session = scope.session;
    // A request that is over has no session until the next use makes one.
    if (session === undefined || (scope.over !== undefined && session.closed)) {
      if (scope.ended && scope.over === undefined) {
        throw new SessionClosedError(`The session of registry "${this.name}"`, "its scope has ended");
      }
      return undefined;
    }
    if (!session._usableFrom(frame)) throw session._closedError();
    return session;
  }

  /**
   * Close the current scope's session now: roll back an open transaction,
   * release the connection, forget it (the next {@link current} creates a new
   * one). Idempotent; does nothing outside a scope. A failed ROLLBACK or
   * `afterRollback` callback is reported through the `error` event, not thrown.
   *
   * @returns a promise that resolves once the session is closed and its `afterRollback` callbacks have run
   * @example
   * ```ts
   * await db.scope(async () => {
   *   await importBatch(first);
   *   await db.remove(); // uncommitted work rolled back, connection released
   *   await importBatch(second); // on a new session
   * });
   * ```
   */
  async remove(): Promise<void> {
    const frame = storage.getStore();
    const scope = findScope(frame, this);
    const session = scope?.session;
    // Nothing to remove, or it is closing or closed already (by its block, or by an earlier remove()).
    if (scope === undefined || session === undefined || !session._usableFrom(frame)) return;
    scope.session = undefined;
    await session._runCallbacks(await session._close());
  }

  /**
   * An `EntityManager` that resolves, call by call, to the current scope's
   * session. Getting it never fails; calling it outside a scope rejects with
   * {@link NoActiveSessionError} (its synchronous methods, such as `create` and
   * `createQueryBuilder`, and property reads throw it).
   *
   * @example
   * ```ts
   * await db.withTransaction(() => db.manager.increment(Counter, { id: 1 }, "n", 1));
   * ```
   */
  get manager(): EntityManager {
    return (this.#manager ??= scopedManager(this));
  }

  /**
   * A repository that resolves, call by call, to the current scope's session: a
   * module-level `const users = db.getRepository(User)` is safe to share. Getting it
   * never fails; calling it outside a scope rejects with {@link NoActiveSessionError}
   * (its synchronous methods, such as `create` and `createQueryBuilder`, and property
   * reads throw it).
   *
   * @param target - the entity class, schema or name
   * @returns the scoped repository (the same object on every call with the same `target`)
   * @example
   * ```ts
   * const users = db.getRepository(User);
   * export const findUser = (id: number) => users.findOneBy({ id }); // runs on the caller's session
   * ```
   */
  getRepository<E extends ObjectLiteral>(target: EntityTarget<E>): Repository<E> {
    let repository = this.#repositories.get(target);
    if (repository === undefined) {
      repository = scopedRepository(this, target);
      this.#repositories.set(target, repository);
    }
    return repository as Repository<E>;
  }

  /**
   * Listen to an event: `open`, `connect` (a connection was actually taken),
   * `begin`, `commit`, `rollback`, `close`, `timeout`, `leak`, `error` (a failure
   * that could not be thrown to anyone, such as a failed rollback or an
   * `afterCommit` callback that threw). Without an `error` listener such failures
   * become process warnings. Listeners run synchronously, in the order they were
   * added; one that throws is reported through `error` (a throwing `error`
   * listener, as a process warning).
   *
   * @param event - the event name, see {@link SessionEventName}
   * @param listener - called with a {@link SessionEvent}
   * @returns this registry, for chaining
   * @throws RangeError when `event` is not an event name
   * @throws TypeError when `listener` is not a function
   * @example
   * ```ts
   * db.on("commit", ({ session, durationMs }) => log.debug(`#${session.id} committed in ${durationMs} ms`));
   * ```
   */
  on(event: SessionEventName, listener: SessionListener): this {
    this.#events.on(event, listener);
    return this;
  }

  /**
   * Remove a listener added with {@link on}. Does nothing when it is not listening.
   *
   * @param event - the event name it was added for
   * @param listener - the same function that was passed to {@link on}
   * @returns this registry, for chaining
   * @example
   * ```ts
   * const onLeak: SessionListener = ({ stack }) => log.warn(stack);
   * db.on("leak", onLeak);
   * // ...
   * db.off("leak", onLeak);
   * ```
   */
  off(event: SessionEventName, listener: SessionListener): this {
    this.#events.off(event, listener);
    return this;
  }

  /**
   * Counters since the registry was created: a snapshot, not updated afterwards.
   *
   * @returns `{ active, peak, opened, closed, commits, rollbacks, timeouts, leaks }`, see {@link SessionStats}
   * @example
   * ```ts
   * setInterval(() => metrics.gauge("db.sessions.active", db.stats().active), 10_000).unref();
   * ```
   */
  stats(): SessionStats {
    return this.#pool.stats();
  }

  /**
   * A new session that the caller owns, for explicit use: the counterpart of
   * Python's `with Session() as s:`. Close it with `await using` or
   * `try { ... } finally { await s.close() }`. It is bound to no scope
   * (`current()` does not see it; {@link Session.run} makes it current for the code
   * it runs) and never joins the caller's session. A transaction it began
   * (`transaction: true` or `s.begin()`) and did not commit with `s.commit()` is
   * rolled back when it closes. Outside a transaction it takes a pooled connection
   * per statement, like every session (`holdConnection: true` keeps one).
   *
   * @param options - `transaction`, `isolation`, `readOnly`, `timeoutMs` (then it is
   *   force-closed, and later use fails with {@link SessionClosedError}), `name`, `holdConnection`
   * @returns the open session (its transaction begun, with `transaction: true`)
   * @throws TypeError/RangeError (as a rejection) on invalid options, or options of a block that do not apply
   * @throws {@link PropagationError} (as a rejection) on SQLite inside an open transaction of the caller's
   *   scope, whose single connection the new session would wait for forever
   * @throws {@link RegistryClosedError} (as a rejection) once {@link drain} has begun
   * @example
   * ```ts
   * await using s = await db.open({ transaction: true });
   * await s.getRepository(Invoice).save(invoices);
   * await s.commit(); // without it, closing rolls back
   * ```
   */
  open(options?: OpenOptions): Promise<Session> {
    return openExplicit(this, options);
  }

  /**
   * Run `fn(session)` in a fresh scope with its own session that does not inherit
   * the caller's: work started from a request that must outlive it. Its result, as
   * a promise.
   *
   * @param fn - the body; receives the new session
   * @param options - block options; `propagation` does not apply
   * @returns what `fn` returns, once the new session is removed
   * @throws TypeError/RangeError (as a rejection) when `fn` is not a function or on invalid options
   * @throws {@link PropagationError} (as a rejection) on SQLite when the caller's scope holds an open transaction
   * @throws {@link RegistryClosedError} (as a rejection) while the registry drains
   * @throws {@link SessionTimeoutError}, {@link RegistryNotConfiguredError} (as rejections) as {@link withSession} does
   * @example
   * ```ts
   * app.post("/reports", async (req, res) => {
   *   void db.detached(() => buildReport(req.body)); // goes on after the response
   *   res.status(202).end();
   * });
   * ```
   */
  detached<T>(fn: SessionBody<T>, options?: SessionOptions): Promise<T> {
    return runBlock(this, fn, options, false, true);
  }

  /**
   * @internal {@link detached} for bookkeeping that a {@link _hold} covers: let through
   * while the registry drains, as long as its DataSource is not destroyed.
   */
  _detachedDuringDrain<T>(fn: SessionBody<T>, options?: SessionOptions): Promise<T> {
    return runBlock(this, fn, options, false, "duringDrain");
  }

  /**
   * @internal Make drain() wait, as for an open session, until the returned function is
   * called (once or more); `undefined` once drain() has begun.
   */
  _hold(): (() => void) | undefined {
    return this.#pool.hold();
  }

  /** @internal Whether drain() has begun and configure() has not opened the registry again. */
  get _draining(): boolean {
    return this.#pool.draining;
  }

  /**
   * Shut down: refuse new sessions ({@link RegistryClosedError}), wait for the open
   * ones to end, force-close (roll back, release) those still open after
   * `timeoutMs` — their blocks reject with {@link SessionClosedError} — and
   * optionally destroy the DataSource. Call it on SIGTERM. `configure()` opens the
   * registry again.
   *
   * @param options - `timeoutMs` (default: wait as long as it takes), `destroy` (default false)
   * @returns how many sessions ended by themselves (`waited`) and how many were forced
   * @throws TypeError/RangeError (as a rejection) on invalid options
   * @example
   * ```ts
   * process.once("SIGTERM", async () => {
   *   server.close();
   *   const { forced } = await db.drain({ timeoutMs: 10_000, destroy: true });
   *   process.exit(forced === 0 ? 0 : 1);
   * });
   * ```
   */
  drain(options: DrainOptions = {}): Promise<DrainResult> {
    return this.#pool.drain(options, () => this.#host?.dataSource);
  }

  /**
   * @internal The initialized host, or a rejection. Synchronous once ready, so
   * that a block costs no extra tick after the first one.
   */
  _ready(): SessionHost | Promise<SessionHost> {
    if (this.#host !== undefined) return this.#host;
    if (this.#initializing === undefined) {
      const initializing = this.#initialize();
      this.#initializing = initializing;
      // A failed initialization is not cached: the next block tries again.
      initializing.catch(() => {
        if (this.#initializing === initializing) this.#initializing = undefined;
      });
    }
    return this.#initializing;
  }

  /** @internal The host of a registry that is known to be ready. */
  _host(): RegistryHost {
    const host = this.#host;
    if (host === undefined) throw new RegistryNotConfiguredError(this.name);
    return host;
  }

  async #initialize(): Promise<SessionHost> {
    const input = this.#input;
    if (input === undefined) throw new RegistryNotConfiguredError(this.name);
    const dataSource = typeof input === "function" ? await input() : input;
    if (!isDataSource(dataSource)) {
      throw new TypeError(
        `Expected \`dataSource\` to be a TypeORM DataSource, got ${describe(dataSource)}.${typeormCopies()}`,
      );
    }
    const initializing = initializeOnce(dataSource);
    if (initializing !== undefined) await initializing;
    if (this.#input !== input) return this._ready(); // reconfigured meanwhile: use the new one
    this.#host = new DataSourceHost(this, this.#pool, this.#events, dataSource, this.#settings);
    return this.#host;
  }
}

/**
 * Create a registry. Several registries (several databases) live side by side.
 *
 * @param options - `dataSource` (or a function returning one), or `url` plus DataSource options;
 *   `name`, `leakDetectionMs`, `tracing`, `replicas`; without a data source, call {@link SessionRegistry.configure} before first use
 * @throws TypeError/RangeError on invalid options; with `url`, TypeORM's error when the driver
 *   package (`pg`, `sqlite3`, `better-sqlite3`) is not installed
 * @example
 * ```ts
 * export const db = createSessionRegistry({ url: "postgres://app@localhost/app", entities: [User], name: "main" });
 * ```
 */
export function createSessionRegistry(options?: SessionRegistryOptions): SessionRegistry {
  return new SessionRegistry(options);
}

/** The registry used by the bare functions ({@link withSession}, {@link currentSession}, ...). */
export const defaultRegistry: SessionRegistry = new SessionRegistry({ name: "default" });

/**
 * Configure {@link defaultRegistry}: give it a DataSource (or a function making one) or a URL.
 * The same as `defaultRegistry.configure(options)`.
 *
 * @param options - `dataSource` (or a function returning one), or `url` plus DataSource options;
 *   `leakDetectionMs`, `tracing`, `replicas`
 * @throws TypeError/RangeError on invalid options
 * @throws {@link RegistryBusyError} while its sessions are open
 * @example
 * ```ts
 * configureSessions({ dataSource: AppDataSource });
 * ```
 */
export function configureSessions(options: SessionRegistryOptions): void {
  defaultRegistry.configure(options);
}
