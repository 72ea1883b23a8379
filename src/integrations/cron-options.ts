/**
 * The options of `DatabaseRunCoordinator`, and the error that names a forgotten `registry`.
 *
 * @module
 */
import { defaultRegistry, RegistryNotConfiguredError, SessionRegistry } from "../index.js";
import { describe } from "../core/describe.js";

/** Options of {@link DatabaseRunCoordinator}. */
export interface DatabaseRunCoordinatorOptions {
  /**
   * The registry whose database keeps the leases.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
  /**
   * The lease table: a plain SQL identifier (letters, digits, `_`; up to 48
   * characters), created with its index if missing.
   * @default "scoped_session_cron_leases"
   */
  table?: string;
  /**
   * At-least-once instead of at-most-once: a fire whose instance died while running
   * it (its lease lapsed, `leaseMs` without a heartbeat) is run again, from the start,
   * by one of the other instances that asked for it and are still up. Every instance
   * of a task must use the same value.
   * @default false
   */
  takeover?: boolean;
  /**
   * With `takeover`: how long a running fire's lease lasts without a heartbeat, in
   * milliseconds (from 100 up). The instance running it renews it every third of
   * this; the others look every quarter. Shorter: quicker takeover; it must exceed
   * the longest stall of the holder (event-loop block, and on SQLite the longest
   * transaction of a tick, since the heartbeat waits for the single connection).
   * @default 15000
   */
  leaseMs?: number;
}

const OPTIONS = new Set(["registry", "table", "takeover", "leaseMs"]);
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,47}$/;
const DEFAULT_LEASE_MS = 15_000;
const MIN_LEASE_MS = 100;

/** Checked options, defaults applied. @internal */
export interface ResolvedCoordinatorOptions {
  readonly registry: SessionRegistry;
  readonly table: string;
  readonly takeover: boolean;
  /** With takeover only. */
  readonly leaseMs: number | undefined;
}

/**
 * Check `DatabaseRunCoordinator`'s options and apply the defaults.
 *
 * @internal
 */
export function resolveCoordinatorOptions(options: DatabaseRunCoordinatorOptions): ResolvedCoordinatorOptions {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`Expected DatabaseRunCoordinator options to be an object, got ${describe(options)}`);
  }
  for (const key of Object.keys(options)) {
    if (!OPTIONS.has(key)) {
      throw new TypeError(
        `Unknown DatabaseRunCoordinator option \`${key}\`; expected one of registry, table, takeover, leaseMs`,
      );
    }
  }
  const { registry = defaultRegistry, table = "scoped_session_cron_leases", takeover = false, leaseMs } = options;
  if (!(registry instanceof SessionRegistry)) {
    throw new TypeError(`Expected \`registry\` to be a SessionRegistry, got ${describe(registry)}`);
  }
  if (typeof table !== "string") throw new TypeError(`Expected \`table\` to be a string, got ${describe(table)}`);
  if (!IDENTIFIER.test(table)) {
    throw new RangeError(
      `Expected \`table\` to be a plain SQL identifier (a letter or _, then letters, digits or _; up to 48 characters), got ${describe(table)}`,
    );
  }
  if (typeof takeover !== "boolean") {
    throw new TypeError(`Expected \`takeover\` to be a boolean, got ${describe(takeover)}`);
  }
  if (leaseMs !== undefined) {
    if (!takeover) {
      throw new TypeError(
        "`leaseMs` applies only with `takeover: true` (without takeover a fire's lease lasts node-cron's `distributedLease`): add `takeover: true` or remove `leaseMs`",
      );
    }
    if (typeof leaseMs !== "number") {
      throw new TypeError(`Expected \`leaseMs\` to be a number of milliseconds, got ${describe(leaseMs)}`);
    }
    if (!Number.isFinite(leaseMs) || leaseMs < MIN_LEASE_MS) {
      throw new RangeError(
        `Expected \`leaseMs\` to be a finite number of milliseconds from ${MIN_LEASE_MS} up, got ${describe(leaseMs)}`,
      );
    }
  }
  return { registry, table, takeover, leaseMs: takeover ? Math.ceil(leaseMs ?? DEFAULT_LEASE_MS) : undefined };
}

/**
 * The default registry's RegistryNotConfiguredError, for an integration that was
 * given no `registry` option, reworded to name the likely fix: the application made
 * a registry of its own and meant that one.
 *
 * @internal
 */
export function noRegistryGiven(error: unknown, caller: "sessionTask" | "DatabaseRunCoordinator"): unknown {
  if (!(error instanceof RegistryNotConfiguredError)) return error;
  const fix =
    caller === "sessionTask" ? "sessionTask(fn, { registry: db })" : "new DatabaseRunCoordinator({ registry: db })";
  const loud = new RegistryNotConfiguredError(error.registryName);
  loud.message =
    `${caller} was given no \`registry\` option, so it uses the default registry ("${error.registryName}"), ` +
    `which has no data source. If your application made its own registry ` +
    `(const db = createSessionRegistry(...)), pass it: ${fix} — the same registry for the task and ` +
    `its DatabaseRunCoordinator. Otherwise call configureSessions({ dataSource }) at start-up.`;
  return loud;
}
