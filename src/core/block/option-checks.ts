import { describe } from "../describe.js";
import type { IsolationLevel, Propagation, RetryOptions, SessionOptions } from "./options.js";
import { isRegistry } from "../registry/registry-brand.js";
import type { SessionRegistry } from "../registry/registry.js";
import { isRetryableError, type ResolvedRetry } from "./retry.js";

/**
 * @internal Options after validation, defaults applied.
 *
 * @example
 * ```ts
 * const opts: ResolvedOptions = resolveOptions({ retry: 3 }, "transfer", true);
 * ```
 */
export interface ResolvedOptions {
  readonly registry: SessionRegistry | undefined;
  readonly transaction: boolean;
  readonly isolation: IsolationLevel | undefined;
  readonly propagation: Propagation;
  readonly savepoint: boolean;
  readonly readOnly: boolean;
  readonly durable: boolean;
  readonly name: string | undefined;
  readonly timeoutMs: number | undefined;
  readonly retry: ResolvedRetry | undefined;
  readonly holdConnection: boolean;
}

const ISOLATION_LEVELS: readonly IsolationLevel[] = [
  "READ UNCOMMITTED",
  "READ COMMITTED",
  "REPEATABLE READ",
  "SERIALIZABLE",
];
const PROPAGATIONS: readonly Propagation[] = ["required", "requiresNew", "mandatory"];
const KNOWN = new Set<string>([
  "registry",
  "transaction",
  "isolation",
  "propagation",
  "savepoint",
  "readOnly",
  "durable",
  "name",
  "timeoutMs",
  "retry",
  "holdConnection",
]);
/** The keys of `OpenOptions`: those of a block that apply to a session the caller owns. */
const OPEN_KNOWN = new Set<string>([
  "registry",
  "transaction",
  "isolation",
  "readOnly",
  "timeoutMs",
  "name",
  "holdConnection",
]);

/**
 * @internal Validate block options. Throws `TypeError`/`RangeError` naming the
 * option and the value received.
 *
 * @example
 * ```ts
 * const opts = resolveOptions(options, fn.name === "" ? undefined : fn.name, true); // withTransaction's
 * ```
 */
export function resolveOptions(
  options: unknown,
  fallbackName: string | undefined,
  transactional: boolean,
): ResolvedOptions {
  if (options === undefined || options === null) {
    return {
      registry: undefined,
      transaction: transactional,
      isolation: undefined,
      propagation: "required",
      savepoint: true,
      readOnly: false,
      durable: false,
      name: fallbackName,
      timeoutMs: undefined,
      retry: undefined,
      holdConnection: false,
    };
  }
  if (typeof options !== "object")
    throw new TypeError(`Expected session options to be an object, got ${describe(options)}`);
  for (const key of Object.keys(options)) {
    if (!KNOWN.has(key)) {
      throw new TypeError(`Unknown session option \`${key}\`; expected one of ${[...KNOWN].join(", ")}`);
    }
  }
  const o = options as SessionOptions;
  if (o.registry !== undefined && !isRegistry(o.registry)) {
    throw new TypeError(`Expected \`registry\` to be a SessionRegistry, got ${describe(o.registry)}`);
  }
  if (o.name !== undefined && typeof o.name !== "string") {
    throw new TypeError(`Expected \`name\` to be a string, got ${describe(o.name)}`);
  }
  const isolation = expectOneOf("isolation", o.isolation, ISOLATION_LEVELS);
  const readOnly = expectBoolean(o, "readOnly");
  const durable = expectBoolean(o, "durable");
  const savepoint = o.savepoint === undefined ? true : expectBoolean(o, "savepoint");
  const transaction =
    (o.transaction === undefined ? transactional : expectBoolean(o, "transaction") || transactional) ||
    isolation !== undefined ||
    readOnly ||
    durable;
  if (o.transaction === false && (isolation !== undefined || readOnly || durable)) {
    throw new TypeError(
      `\`transaction: false\` contradicts ${isolation !== undefined ? "`isolation`" : readOnly ? "`readOnly`" : "`durable`"}, which needs a transaction`,
    );
  }
  const retry = resolveRetry(o.retry);
  if (retry !== undefined && !transaction) {
    throw new TypeError(
      `\`retry\` re-runs a transaction, so it needs \`transaction: true\` (or withTransaction), got retry ${describe(o.retry)} without one`,
    );
  }
  return {
    registry: o.registry,
    transaction,
    isolation,
    propagation: expectOneOf("propagation", o.propagation, PROPAGATIONS) ?? "required",
    savepoint,
    readOnly,
    durable,
    name: o.name ?? fallbackName,
    timeoutMs: expectDuration("timeoutMs", o.timeoutMs),
    retry,
    holdConnection: expectBoolean(o, "holdConnection"),
  };
}

/**
 * @internal Validate the options of `open()`; those of a block that do not apply are refused by name.
 *
 * @example
 * ```ts
 * const opts = resolveOpenOptions({ transaction: true, timeoutMs: 5_000 });
 * ```
 */
export function resolveOpenOptions(options: unknown): ResolvedOptions {
  if (typeof options === "object" && options !== null) {
    for (const key of Object.keys(options)) {
      if (KNOWN.has(key) && !OPEN_KNOWN.has(key)) {
        throw new TypeError(
          `\`${key}\` does not apply to open(): an opened session is always a new one, on its own connection, ` +
            `that never joins another. Use a block (withSession/withTransaction) for \`${key}\`.`,
        );
      }
    }
  }
  return resolveOptions(options, undefined, false);
}

function expectBoolean(
  options: SessionOptions,
  key: "transaction" | "savepoint" | "readOnly" | "durable" | "holdConnection",
): boolean {
  const value: unknown = options[key];
  if (value === undefined) return false;
  if (typeof value !== "boolean") throw new TypeError(`Expected \`${key}\` to be a boolean, got ${describe(value)}`);
  return value;
}

function expectOneOf<T extends string>(key: string, value: unknown, allowed: readonly T[]): T | undefined {
  if (value === undefined) return undefined;
  if (!allowed.includes(value as T)) {
    throw new RangeError(
      `Expected \`${key}\` to be one of ${allowed.map((a) => JSON.stringify(a)).join(", ")}, got ${describe(value)}`,
    );
  }
  return value as T;
}

function expectDuration(key: string, value: unknown): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new RangeError(`Expected \`${key}\` to be a number of milliseconds above 0, got ${describe(value)}`);
  }
  return value;
}

function expectCount(key: string, value: unknown): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0) {
    throw new RangeError(`Expected \`${key}\` to be a whole number from 0 up, got ${describe(value)}`);
  }
  return value;
}

function resolveRetry(retry: unknown): ResolvedRetry | undefined {
  if (retry === undefined) return undefined;
  if (typeof retry === "number") {
    const retries = expectCount("retry", retry);
    return retries === 0 ? undefined : { retries, baseDelayMs: 10, maxDelayMs: 1000, retryOn: isRetryableError };
  }
  if (typeof retry !== "object" || retry === null) {
    throw new TypeError(
      `Expected \`retry\` to be a number or { retries, baseDelayMs?, maxDelayMs?, retryOn? }, got ${describe(retry)}`,
    );
  }
  const r = retry as RetryOptions;
  const retries = expectCount("retry.retries", r.retries);
  if (r.retryOn !== undefined && typeof r.retryOn !== "function") {
    throw new TypeError(`Expected \`retry.retryOn\` to be a function, got ${describe(r.retryOn)}`);
  }
  const baseDelayMs = r.baseDelayMs === undefined ? 10 : expectCount("retry.baseDelayMs", r.baseDelayMs);
  const maxDelayMs =
    r.maxDelayMs === undefined ? Math.max(1000, baseDelayMs) : expectCount("retry.maxDelayMs", r.maxDelayMs);
  if (retries === 0) return undefined;
  return { retries, baseDelayMs, maxDelayMs, retryOn: r.retryOn ?? isRetryableError };
}
