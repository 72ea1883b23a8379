/**
 * {@link DatabaseRunCoordinator}: node-cron 4 leases in the application's own database.
 * Re-exported by `typeorm-scoped-session/cron`.
 *
 * @module
 */
import type { RunCoordinator } from "node-cron";
import { RegistryClosedError } from "../index.js";
import type { Session, SessionRegistry } from "../index.js";
import { describe } from "../core/describe.js";
import { createLeaseTable, type LeaseSql, leaseStatement } from "./cron-leases.js";
import { type DatabaseRunCoordinatorOptions, resolveCoordinatorOptions } from "./cron-options.js";

/** A fire this coordinator granted and node-cron has not completed. */
interface Fire {
  readonly ttlMs: number;
  /** Taken when the fire's tick begins, given back by onComplete: drain() waits for it. */
  release: (() => void) | undefined;
  timer?: NodeJS.Timeout;
  done: boolean;
  /** A `sessionTask` tick of this fire has begun. */
  started: boolean;
  /** That tick was refused before its body ran (the registry drains): the fire did not run. */
  refused: boolean;
}

/**
 * The fires granted in this process and not yet completed, by registry and key, for
 * {@link tickBegins}. node-cron runs a granted fire only after its `maxRandomDelay`
 * jitter, which `task.stop()` cancels (and then never calls `onComplete`): a fire is
 * known to run only once its tick begins.
 */
const granted = new WeakMap<SessionRegistry, Map<string, Fire>>();

/**
 * @internal `sessionTask`: the tick of fire `key` (`name:ISO-time`) begins on
 * `registry`. If a coordinator of this process granted that fire, drain() now waits
 * for its `onComplete`; the returned callback says that the tick was refused before
 * its body ran, so that `onComplete` hands the fire back instead of recording it.
 */
export function tickBegins(registry: SessionRegistry, key: string): (() => void) | undefined {
  const fire = granted.get(registry)?.get(key);
  if (fire === undefined || fire.done) return undefined;
  fire.started = true;
  fire.release ??= registry._hold();
  return () => {
    fire.refused = true;
  };
}

/** A timer that keeps no process alive. */
const pause = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms).unref());

/**
 * A node-cron 4 `RunCoordinator` that keeps leases in a table of the registry's own
 * database (PostgreSQL or SQLite), so that `distributed: true` runs each fire on
 * one instance without Redis.
 *
 * node-cron asks {@link shouldRun} once per fire and instance, with one key per fire
 * (`name:ISO-time`), and calls {@link onComplete} after running it. Two guarantees:
 *
 * - **At most once** (default, like node-cron's own coordinators): the key is granted
 *   to exactly one caller, by one atomic statement, and to nobody else until its lease
 *   (`distributedLease`, node-cron's default 30 s) expires, even after
 *   {@link onComplete}, which only records completion: asking again gives `false`,
 *   also to the winner. A fire whose instance dies mid-run is not run again.
 * - **At least once** (`takeover: true`): the winner's lease lasts `leaseMs` and is
 *   renewed by a heartbeat while the fire runs. The other callers wait (their
 *   {@link shouldRun} stays pending) until the fire completes (`false`) or its lease
 *   lapses without completion: then one of them takes it over (`true`) and runs the
 *   same fire (same `context.date`) from the start. A fire may run twice when its
 *   holder stalls longer than `leaseMs`; nobody takes over when no other instance
 *   asked for the fire. A completed fire is never granted again. With node-cron's
 *   `noOverlap`, an instance waiting for a running fire skips its next fires, as the
 *   holder does.
 *
 * Both let a graceful stop through: while the registry drains, {@link shouldRun}
 * resolves `false` (the instance declines the fire; with takeover a lease it had just
 * won is handed back), and `drain()` waits for the granted fires whose `sessionTask`
 * tick has begun, letting their heartbeat and {@link onComplete} reach the database, as
 * long as the DataSource is not destroyed (a `timeoutMs` that runs out does not wait
 * for them). A granted fire whose tick has not begun (node-cron's `maxRandomDelay`,
 * which `task.stop()` cancels) does not hold the drain; refused by it, it is not
 * recorded as completed, and with takeover it is handed back to a live instance.
 *
 * Expired leases are purged during later acquisitions (with takeover, completed ones,
 * and lapsed ones after a day). Times come from the database's clock, so instances
 * whose clocks differ still agree. The table is created on first use if missing
 * (`CREATE TABLE IF NOT EXISTS`, once per coordinator): `key` (primary key),
 * `acquired_at`, `expires_at`, `completed_at`, in milliseconds since the epoch. Create
 * it in a migration instead if the application's database user may not create tables.
 * Give each mode its own table: without takeover, the purge deletes lapsed leases.
 *
 * Its statements run in their own sessions of the registry (never in the caller's
 * scope or transaction), so on SQLite they take their turn on the single connection.
 * Give the task's `sessionTask` the same registry (`{ registry: db }`): each defaults
 * to the default registry on its own. Without the option, while the default registry
 * has no data source, {@link shouldRun} rejects with a
 * {@link typeorm-scoped-session!RegistryNotConfiguredError} that says so, and node-cron
 * skips the fire (`execution:skipped`, reason `coordinator-error`).
 *
 * @example
 * ```ts
 * import cron from "node-cron";
 * import { DatabaseRunCoordinator, sessionTask } from "typeorm-scoped-session/cron";
 *
 * cron.schedule("0 * * * *", sessionTask(sendReminders, { registry: db }), {
 *   name: "reminders", // forms the keys: every instance must use the same name
 *   distributed: true,
 *   runCoordinator: new DatabaseRunCoordinator({ registry: db, takeover: true }),
 * });
 * ```
 */
export class DatabaseRunCoordinator implements RunCoordinator {
  /** The registry whose database keeps the leases. */
  readonly registry: SessionRegistry;
  /** The lease table. */
  readonly table: string;
  /** Whether a fire whose holder died is taken over (at least once), or not (at most once). */
  readonly takeover: boolean;
  /** With {@link takeover}: how long a running fire's lease lasts without a heartbeat; else `undefined`. */
  readonly leaseMs: number | undefined;

  /** Whether no `registry` option was given (the default registry is used). */
  readonly #defaulted: boolean;
  /** The table creation in progress or done, and the DataSource it was done on. */
  #prepared: { dataSource: object | undefined; promise: Promise<LeaseSql> } | undefined;
  /** The fires granted here and not yet completed, by key. */
  readonly #fires = new Map<string, Fire>();

  /**
   * Create a coordinator on the database of `options.registry`. Only checks the
   * options: the database is first touched, and the table created if missing, by
   * the first {@link shouldRun} or {@link onComplete}.
   *
   * @param options - `registry` (default: the default registry), `table` (default
   *   `"scoped_session_cron_leases"`), `takeover` (default false), `leaseMs` (with
   *   takeover; default 15000)
   * @throws TypeError on options that are not an object, an unknown option, a
   *   `registry` that is not a SessionRegistry, a `takeover` that is not a boolean, a
   *   `leaseMs` that is not a number or is given without `takeover: true`; RangeError
   *   on a `table` that is not a plain SQL identifier or a `leaseMs` below 100
   * @example
   * ```ts
   * const coordinator = new DatabaseRunCoordinator({ registry: db, takeover: true, leaseMs: 10_000 });
   * ```
   */
  constructor(options: DatabaseRunCoordinatorOptions = {}) {
    const { registry, table, takeover, leaseMs } = resolveCoordinatorOptions(options);
    this.registry = registry;
    this.#defaulted = options.registry === undefined;
    this.table = table;
    this.takeover = takeover;
    this.leaseMs = leaseMs;
  }

  /**
   * Whether this caller runs the fire `key`. Without takeover: take the lease for
   * `ttlMs` if nobody holds it, `true` for exactly one caller and `false` for everyone
   * else (the winner included) until it expires. With takeover: `true` for the first
   * caller (lease `leaseMs`, renewed while the fire runs); the others wait and get
   * `false` once the fire completes, or `true` for the one that takes over a lapsed
   * lease. `false` while the registry drains. Also deletes up to 100 old leases.
   *
   * @param key - one fire of one task, as node-cron forms it: `name:ISO-time`
   * @param ttlMs - without takeover, how long the lease lasts; with it, how long a
   *   completed fire is kept (at least `leaseMs`), in milliseconds
   * @returns whether this caller runs the fire
   * @throws TypeError/RangeError (as a rejection) on an empty key or a ttl that is not a positive number
   * @throws (as a rejection) the database error when the lease could not be read or written; node-cron then skips the fire
   * @throws Error (as a rejection) when the registry's database is neither PostgreSQL nor SQLite
   * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError} (as a rejection) while the registry has no data source
   * @example
   * ```ts
   * if (await coordinator.shouldRun("report:2025-01-01T00:00:00.000Z", 60_000)) {
   *   try { await buildReport(); } finally { await coordinator.onComplete("report:2025-01-01T00:00:00.000Z"); }
   * }
   * ```
   */
  async shouldRun(key: string, ttlMs: number): Promise<boolean> {
    assertKey(key);
    if (typeof ttlMs !== "number" || !Number.isFinite(ttlMs) || ttlMs <= 0) {
      throw new RangeError(`Expected \`ttlMs\` to be a number of milliseconds above 0, got ${describe(ttlMs)}`);
    }
    const granted = await this.#claim(key, ttlMs, async (sql) => {
      return this.#run("DatabaseRunCoordinator.shouldRun", false, async (s) => {
        await s.query(sql.purge);
        const result = await s.queryRunner.query(sql.acquire, [key, this.leaseMs ?? Math.ceil(ttlMs)], true);
        return (result.affected ?? 0) > 0;
      });
    });
    return granted !== undefined ? granted : this.#wait(key, ttlMs);
  }

  /**
   * Record that the fire `key` has finished (`completed_at`) and stop its heartbeat.
   * The lease is kept (without takeover until it expires; with takeover for the
   * `ttlMs` given to {@link shouldRun}, at least `leaseMs`), so the fire is not run
   * again. Runs while the registry drains, which waits for it.
   *
   * @param key - the key given to {@link shouldRun}
   * @throws TypeError (as a rejection) on an empty key; the database error when it could not be written
   * @throws {@link typeorm-scoped-session!RegistryNotConfiguredError},
   *   {@link typeorm-scoped-session!RegistryClosedError} (as rejections) while the registry has no data
   *   source, or once it drains for a key it did not grant
   * @example
   * ```ts
   * await coordinator.onComplete("report:2025-01-01T00:00:00.000Z");
   * ```
   */
  async onComplete(key: string): Promise<void> {
    assertKey(key);
    const fire = this.#fires.get(key);
    if (fire !== undefined) this.#end(key, fire);
    try {
      const sql = await this.#prepare();
      if (fire?.refused === true) {
        // Its tick never ran (the registry drains): not completed. With takeover a live instance runs it.
        if (this.takeover)
          await this.#run("DatabaseRunCoordinator.handBack", true, (s) => s.query(sql.handBack, [key]));
        return;
      }
      const keep = Math.ceil(Math.max(fire?.ttlMs ?? 0, this.leaseMs ?? 0));
      await this.#run("DatabaseRunCoordinator.onComplete", fire !== undefined, (s) =>
        s.query(sql.complete, this.takeover ? [keep, key] : [key]),
      );
    } finally {
      fire?.release?.();
    }
  }

  /**
   * Ask `attempt` for the fire under a hold on the registry (drain() waits for a
   * granted fire), and start the fire's heartbeat when it grants; `false` when the
   * registry drains, `undefined` when not granted.
   */
  async #claim(key: string, ttlMs: number, attempt: (sql: LeaseSql) => Promise<boolean>): Promise<boolean | undefined> {
    if (this.registry._draining) return false;
    let sql: LeaseSql;
    try {
      sql = await this.#prepare();
      if (!(await attempt(sql))) return this.takeover ? undefined : false;
    } catch (error) {
      if (error instanceof RegistryClosedError && this.registry._draining) return false;
      throw error;
    }
    if (this.registry._draining) {
      // Declined: with takeover a live instance takes the fire over at once.
      if (this.takeover) {
        await this.#run("DatabaseRunCoordinator.handBack", true, (s) => s.query(sql.handBack, [key])).catch(
          () => undefined, // then the lease lapses by itself
        );
      }
      return false;
    }
    const previous = this.#fires.get(key);
    if (previous !== undefined) {
      this.#end(key, previous);
      previous.release?.();
    }
    const fire: Fire = { release: undefined, ttlMs, done: false, started: false, refused: false };
    this.#fires.set(key, fire);
    let here = granted.get(this.registry);
    if (here === undefined) granted.set(this.registry, (here = new Map<string, Fire>()));
    here.set(key, fire);
    if (this.takeover) this.#beat(key, fire, sql);
    return true;
  }

  /** With takeover: renew the lease of a running fire every third of `leaseMs`, until it ends. */
  #beat(key: string, fire: Fire, sql: LeaseSql): void {
    const leaseMs = this.leaseMs ?? 0;
    fire.timer = setTimeout(() => {
      if (!fire.started && this.registry._draining) {
        // Granted, but its tick has not begun (node-cron's jitter) and now never will here: hand it back.
        this.#end(key, fire);
        void this.#run("DatabaseRunCoordinator.handBack", true, (s) => s.query(sql.handBack, [key])).catch(
          () => undefined, // then the lease lapses by itself
        );
        return;
      }
      void this.#run("DatabaseRunCoordinator.heartbeat", true, (s) => s.query(sql.renew, [leaseMs, key]))
        .catch(() => undefined) // the next beat tries again; a lease that lapses meanwhile may be taken over
        .then(() => {
          if (!fire.done) this.#beat(key, fire, sql);
        });
    }, leaseMs / 3);
    fire.timer.unref();
  }

  #end(key: string, fire: Fire): void {
    fire.done = true;
    clearTimeout(fire.timer);
    if (this.#fires.get(key) === fire) this.#fires.delete(key);
    const here = granted.get(this.registry);
    if (here?.get(key) === fire) here.delete(key);
  }

  /**
   * With takeover, a caller that did not win: look at the fire every quarter of
   * `leaseMs` until it completes or is gone (`false`), its lease lapses and this caller
   * takes it over (`true`), or the registry drains (`false`).
   */
  async #wait(key: string, ttlMs: number): Promise<boolean> {
    const leaseMs = this.leaseMs ?? 0;
    let delay = leaseMs / 4;
    for (;;) {
      await pause(delay);
      if (this.registry._draining) return false;
      let rows: { completed_at: unknown; remaining: unknown }[];
      try {
        const sql = await this.#prepare();
        rows = await this.#run("DatabaseRunCoordinator.watch", false, (s) => s.query(sql.watch, [key]));
      } catch (error) {
        if (error instanceof RegistryClosedError && this.registry._draining) return false;
        throw error;
      }
      const row = rows[0];
      if (row === undefined || row.completed_at !== null) return false;
      const remaining = Number(row.remaining);
      if (remaining > 0) {
        delay = Math.min(leaseMs / 4, remaining + 10);
        continue;
      }
      const granted = await this.#claim(key, ttlMs, async (sql) => {
        const result = await this.#run("DatabaseRunCoordinator.takeOver", false, (s) =>
          s.queryRunner.query(sql.takeOver, [leaseMs, key], true),
        );
        return (result.affected ?? 0) > 0;
      });
      if (granted !== undefined) return granted;
      delay = leaseMs / 4; // another waiter took it over
    }
  }

  /** Create the table if missing, once per DataSource of the registry; learn the dialect. */
  #prepare(): Promise<LeaseSql> {
    const current = this.registry.dataSource;
    const prepared = this.#prepared;
    if (prepared !== undefined && (prepared.dataSource === undefined || prepared.dataSource === current)) {
      return prepared.promise;
    }
    const entry: { dataSource: object | undefined; promise: Promise<LeaseSql> } = {
      dataSource: current,
      promise: this.#run("DatabaseRunCoordinator.createTable", false, async (s) => {
        const sql = await createLeaseTable(this.registry, s, this.table, this.takeover);
        entry.dataSource = s.manager.connection;
        return sql;
      }),
    };
    this.#prepared = entry;
    // A failure is not kept: the next call tries again.
    entry.promise.catch(() => {
      if (this.#prepared === entry) this.#prepared = undefined;
    });
    return entry.promise;
  }

  /** Run `body` in a session of its own, again on a retryable error (see {@link leaseStatement}). */
  #run<T>(name: string, duringDrain: boolean, body: (session: Session) => Promise<T>): Promise<T> {
    return leaseStatement(this.registry, this.#defaulted, name, duringDrain, body);
  }
}

function assertKey(key: unknown): asserts key is string {
  if (typeof key !== "string" || key === "") {
    throw new TypeError(`Expected \`key\` to be a non-empty string, got ${describe(key)}`);
  }
}
