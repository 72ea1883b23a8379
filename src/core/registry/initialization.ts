import type { DataSource } from "typeorm";

// One initialization per DataSource, shared by every registry that uses it and by the
// application's own `initialize()` calls.
//
// TypeORM's `initialize()` is not re-entrant: a second call while the first is in flight
// connects a second pool and, with `synchronize`, runs the schema sync twice (on PostgreSQL
// the second fails on `pg_type_typname_nsp_index` and TypeORM destroys the DataSource). It
// sets `isInitialized` half-way (after the driver connected, before metadata, migrations and
// synchronize), so `isInitialized` alone does not say that an initialization has finished.

/** Initializations in flight, by DataSource; an entry is removed once its initialization settles. */
const inFlight = new WeakMap<DataSource, Promise<void>>();

/** Marks a DataSource whose `initialize` is wrapped by {@link trackInitialization}. */
const TRACKED = Symbol("typeorm-scoped-session.initialize");

/**
 * How long a registry waits for an initialization that the application started before
 * the registry could see it (see {@link driverConnecting}).
 */
export const FOREIGN_INITIALIZE_TIMEOUT_MS = 60_000;

/**
 * From now on, every `initialize()` of `dataSource` (the application's own, another
 * registry's) goes through one shared initialization: a call made while one is in flight
 * gets that one's result instead of connecting again. Outside that window the call is
 * TypeORM's own, unchanged (on an initialized DataSource it still throws TypeORM's
 * `CannotConnectAlreadyConnectedError`). The one write this library makes into the
 * DataSource, done once; idempotent.
 *
 * @internal
 */
export function trackInitialization(dataSource: DataSource): void {
  if (Object.hasOwn(dataSource, TRACKED)) return;
  // Read off the instance to call it with `this` later, as TypeORM's own method or an app's override.
  const own: (this: DataSource) => Promise<DataSource> = Reflect.get(dataSource, "initialize");
  Object.defineProperty(dataSource, TRACKED, { value: own });
  Object.defineProperty(dataSource, "initialize", {
    configurable: true,
    writable: true,
    value: function initialize(this: DataSource): Promise<DataSource> {
      const running = inFlight.get(this);
      if (running !== undefined) return running.then(() => this);
      const started = own.call(this);
      const shared = started.then(() => undefined);
      // Handled here so that a failure is reported once, by whoever awaits it, not also as unhandled.
      const settled = (): void => {
        if (inFlight.get(this) === shared) inFlight.delete(this);
      };
      shared.then(settled, settled);
      inFlight.set(this, shared);
      return started;
    },
  });
}

/**
 * The DataSource initialized once, whoever asks: `undefined` when it is ready now (the
 * fast path stays synchronous), else a promise that settles with the one initialization
 * in flight (joined, never started a second time) or with a new one.
 *
 * @param dataSource - the DataSource (tracked from here on, see {@link trackInitialization})
 * @param timeoutMs - how long to wait for an initialization started before tracking
 * @internal
 */
export function initializeOnce(
  dataSource: DataSource,
  timeoutMs = FOREIGN_INITIALIZE_TIMEOUT_MS,
): Promise<void> | undefined {
  trackInitialization(dataSource);
  const running = inFlight.get(dataSource);
  if (running !== undefined) return running;
  if (dataSource.isInitialized) return undefined;
  if (driverConnecting(dataSource)) return whenInitialized(dataSource, timeoutMs);
  // Through the tracked `initialize`, so that calls made meanwhile join this one.
  void dataSource.initialize().catch(() => undefined);
  return inFlight.get(dataSource);
}

/**
 * Whether the driver of a DataSource that is not initialized is connecting already: an
 * `initialize()` started before {@link trackInitialization} could see it. TypeORM gives no
 * public sign of that; the PostgreSQL drivers (0.3 and 1.x) set their pool (`master`)
 * once it has connected, while `initialize()` still reads the server's version, and clear
 * it on `destroy()`. Unknown drivers, and the time before the pool's first connection,
 * give no sign: then this says `false` and a second initialization starts, as TypeORM
 * would itself. (SQLite drivers keep their handle after `destroy()`, so it is no sign.)
 */
function driverConnecting(dataSource: DataSource): boolean {
  const driver = dataSource.driver as unknown as { master?: unknown } | undefined;
  return (
    typeof dataSource.options.type === "string" &&
    ["postgres", "cockroachdb"].includes(dataSource.options.type) &&
    driver?.master !== undefined &&
    driver.master !== null
  );
}

/**
 * Wait, bounded, until the initialization in flight has set `isInitialized` (by assignment)
 * and its driver's `afterConnect()` (which TypeORM 0.3 runs after building the metadata,
 * after setting `isInitialized`) has resolved. Both are watched for the wait only: the
 * property becomes an accessor, the method an own wrapper, and both are put back after it.
 * Migrations and `synchronize` that TypeORM runs after that are not waited for.
 */
function whenInitialized(dataSource: DataSource, timeoutMs: number): Promise<void> {
  const descriptor = Object.getOwnPropertyDescriptor(dataSource, "isInitialized");
  if (descriptor === undefined || !("value" in descriptor) || descriptor.configurable !== true) {
    return Promise.reject(notInitialized(dataSource, timeoutMs, "its `isInitialized` cannot be watched"));
  }
  const driver = dataSource.driver as unknown as { afterConnect?: (...args: unknown[]) => Promise<void> };
  const afterConnect = driver.afterConnect;
  const ownAfterConnect = Object.getOwnPropertyDescriptor(driver, "afterConnect");
  return new Promise<void>((resolve, reject) => {
    let value = descriptor.value as boolean;
    let connected = typeof afterConnect !== "function";
    const restore = (): void => {
      clearTimeout(timer);
      Object.defineProperty(dataSource, "isInitialized", { ...descriptor, value });
      if (typeof afterConnect !== "function") return;
      if (ownAfterConnect === undefined) delete driver.afterConnect;
      else Object.defineProperty(driver, "afterConnect", ownAfterConnect);
    };
    const check = (): void => {
      if (value && connected) {
        restore();
        resolve();
      }
    };
    const timer = setTimeout(() => {
      restore();
      reject(notInitialized(dataSource, timeoutMs, `it was not initialized within ${timeoutMs} ms`));
    }, timeoutMs);
    Object.defineProperty(dataSource, "isInitialized", {
      configurable: true,
      enumerable: descriptor.enumerable ?? true,
      get: () => value,
      set: (next: boolean) => {
        value = next;
        check();
      },
    });
    if (typeof afterConnect === "function") {
      driver.afterConnect = async function (this: unknown, ...args: unknown[]): Promise<void> {
        await afterConnect.apply(this, args);
        connected = true;
        check();
      };
    }
  });
}

function notInitialized(dataSource: DataSource, timeoutMs: number, why: string): Error {
  // TypeORM 0.3 names DataSources; 1.x does not.
  const name = (dataSource as { name?: unknown }).name;
  return new Error(
    `DataSource${typeof name === "string" ? ` "${name}"` : ""} was being initialized by someone else (its driver was connecting) ` +
      `when the registry first needed it, but ${why} (waited up to ${timeoutMs} ms). Give the registry the ` +
      `DataSource before calling dataSource.initialize() yourself, or await that call (or registry.ready()) ` +
      `before serving requests.`,
  );
}
