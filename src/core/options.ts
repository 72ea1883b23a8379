import { SessionRegistry } from "./registry.js";

/** Transaction isolation levels, as TypeORM names them. */
export type IsolationLevel = "READ UNCOMMITTED" | "READ COMMITTED" | "REPEATABLE READ" | "SERIALIZABLE";

/**
 * How a block relates to the session of its scope.
 *
 * - `"required"`: join the scope's session (creating it if the scope has none yet);
 *   outside any scope, open a new one.
 * - `"requiresNew"`: open a separate session on its own connection.
 * - `"mandatory"`: join the scope's session; outside any scope reject with
 *   {@link NoActiveSessionError}.
 */
export type Propagation = "required" | "requiresNew" | "mandatory";

/** Options of {@link withSession}, {@link withTransaction} and the decorators. */
export interface SessionOptions {
  /**
   * The registry to use.
   * @default defaultRegistry
   */
  registry?: SessionRegistry;
  /**
   * Begin a transaction before the body, commit when it resolves, roll back when it throws.
   * @default false
   */
  transaction?: boolean;
  /**
   * Isolation level of the transaction (implies `transaction: true`). Rejected with
   * {@link PropagationError} on a block that joins an open transaction.
   * @default the driver's default
   */
  isolation?: IsolationLevel;
  /**
   * How the block relates to the session of its scope.
   * @default "required"
   */
  propagation?: Propagation;
  /**
   * A transactional block nested in an open transaction uses a SAVEPOINT, so its
   * failure undoes only its own work. `false`: join the enclosing transaction; an
   * inner failure then dooms it.
   * @default true
   */
  savepoint?: boolean;
  /**
   * A read-only transaction where the database supports it: PostgreSQL
   * (`SET TRANSACTION READ ONLY`) and SQLite (`PRAGMA query_only` for the
   * transaction). Implies `transaction: true`.
   * @default false
   */
  readOnly?: boolean;
  /**
   * The block must be the outermost transaction; nested inside one it rejects with
   * {@link PropagationError}. Implies `transaction: true`.
   * @default false
   */
  durable?: boolean;
  /**
   * Label for errors, events and leak reports.
   * @default the function's or method's name
   */
  name?: string;
}

/** @internal Options after validation, defaults applied. */
export interface ResolvedOptions {
  readonly registry: SessionRegistry | undefined;
  readonly transaction: boolean;
  readonly isolation: IsolationLevel | undefined;
  readonly propagation: Propagation;
  readonly savepoint: boolean;
  readonly readOnly: boolean;
  readonly durable: boolean;
  readonly name: string | undefined;
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
]);

/** `\`value\` (type)`, for messages that show what was received. */
export function describe(value: unknown): string {
  const shown = typeof value === "string" ? JSON.stringify(value) : String(value);
  return `\`${shown}\` (${value === null ? "null" : typeof value})`;
}

function expectBoolean(options: SessionOptions, key: "transaction" | "savepoint" | "readOnly" | "durable"): boolean {
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

/**
 * @internal Validate block options. Throws `TypeError`/`RangeError` naming the
 * option and the value received.
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
  if (o.registry !== undefined && !(o.registry instanceof SessionRegistry)) {
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
  return {
    registry: o.registry,
    transaction,
    isolation,
    propagation: expectOneOf("propagation", o.propagation, PROPAGATIONS) ?? "required",
    savepoint,
    readOnly,
    durable,
    name: o.name ?? fallbackName,
  };
}
