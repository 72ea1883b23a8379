import type { DataSource } from "typeorm";
import { describe } from "../describe.js";
import { familyOf } from "../driver/driver.js";
import { type OtelApi, otelApi, STATUS_ERROR, type SpanLike, type TraceAttributes, type TracerLike } from "./otel.js";

/** The name the library's tracer has when `tracing: true`. */
const TRACER_NAME = "typeorm-scoped-session";

/** @internal What a traced transaction level carries (a `Level` of the session's stack). */
export interface TracedLevel {
  readonly savepoint: boolean;
  readonly attempt: number | undefined;
  span?: SpanLike | undefined;
  /** Why the level is rolled back, for its span. */
  failure: unknown;
}

/**
 * @internal A registry's `tracing` option, resolved: it starts a span for each new session
 * while an OpenTelemetry SDK is registered (or with the given tracer), and nothing otherwise.
 * Without `@opentelemetry/api` installed there is no `Tracing` at all; with no SDK registered,
 * a session costs one look-up of the registered SDK (about 20 ns).
 */
export class Tracing {
  readonly #api: OtelApi;
  readonly #tracer: TracerLike | undefined;
  readonly #attributes: TraceAttributes;

  private constructor(api: OtelApi, tracer: TracerLike | undefined, dataSource: DataSource) {
    this.#api = api;
    this.#tracer = tracer;
    const namespace = dbNamespace(dataSource);
    this.#attributes = { "db.system": dbSystem(dataSource) };
    if (namespace !== undefined) this.#attributes["db.namespace"] = namespace;
  }

  /** The tracing of a DataSource host, or `undefined` when there is nothing to trace with. */
  static of(option: TracingOption | undefined, dataSource: DataSource): Tracing | undefined {
    if (option === undefined || option === false) return undefined;
    const api = otelApi();
    if (api === undefined) return undefined;
    return new Tracing(api, option === true ? undefined : option.tracer, dataSource);
  }

  /** The tracer for a new session, or `undefined` while no SDK is registered. */
  #currentTracer(): TracerLike | undefined {
    if (this.#tracer !== undefined) return this.#tracer;
    const provider = this.#api.trace.getTracerProvider();
    // The API's proxy answers `undefined` until an SDK registers: then nothing is made per session.
    if (typeof provider.getDelegateTracer === "function") return provider.getDelegateTracer(TRACER_NAME);
    return provider.getTracer(TRACER_NAME);
  }

  /** The trace of a new (or reopened) session: its span starts now, under the active span. */
  start(id: number, name: string | undefined, replica: boolean): SessionTrace | undefined {
    const tracer = this.#currentTracer();
    if (tracer === undefined) return undefined;
    const attributes: TraceAttributes = { ...this.#attributes, "session.id": id };
    if (replica) attributes["session.replica"] = true;
    const span = tracer.startSpan(
      name === undefined ? "session" : `session ${name}`,
      { attributes },
      this.#api.context.active(),
    );
    // A span the sampler dropped still parents the statements' spans, which are then dropped too.
    return new SessionTrace(this.#api, tracer, span);
  }
}

/**
 * @internal One session's spans: the session's, and one per transaction or savepoint
 * (kept on its level). Statements and block bodies run in the context of the innermost,
 * so that spans of TypeORM's or the driver's instrumentation, and the application's
 * own, nest under it.
 */
export class SessionTrace {
  readonly span: SpanLike;
  readonly #api: OtelApi;
  readonly #tracer: TracerLike;
  /** Levels with a span still open, innermost last: ended when the session closes with them. */
  readonly #open: TracedLevel[] = [];

  constructor(api: OtelApi, tracer: TracerLike, span: SpanLike) {
    this.#api = api;
    this.#tracer = tracer;
    this.span = span;
  }

  /** `fn(...args)` with the innermost open span as the active one. */
  run<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): R {
    const innermost = this.#open.at(-1)?.span ?? this.span;
    const api = this.#api;
    return api.context.with(api.trace.setSpan(api.context.active(), innermost), fn, undefined, ...args);
  }

  /** A transaction or savepoint began: its span starts, a child of the innermost. */
  begin(level: TracedLevel): void {
    const parent = this.#open.at(-1)?.span ?? this.span;
    const api = this.#api;
    const attempt = level.attempt;
    const span = this.#tracer.startSpan(
      level.savepoint ? "savepoint" : "transaction",
      attempt === undefined ? undefined : { attributes: { "retry.attempt": attempt } },
      api.trace.setSpan(api.context.active(), parent),
    );
    // Each attempt of a retried block is a transaction of its own; from the second on, it says so.
    if (attempt !== undefined && attempt > 1) span.addEvent("retry", { "retry.attempt": attempt });
    level.span = span;
    this.#open.push(level);
  }

  /** A level committed or rolled back (`error`: why, when known): its span ends. */
  end(level: TracedLevel, committed: boolean, error: unknown): void {
    const span = level.span;
    if (span === undefined) return;
    level.span = undefined;
    const at = this.#open.lastIndexOf(level);
    if (at !== -1) this.#open.splice(at, 1);
    if (!committed)
      span.addEvent("rollback", error === undefined ? undefined : { "exception.message": message(error) });
    if (error !== undefined) failed(span, error);
    span.end();
  }

  /** The block that owned the session rejected with `error`. */
  fail(error: unknown): void {
    failed(this.span, error);
  }

  /** The session is force-closed (a timeout, a drain): it and the levels it rolls back failed with `reason`. */
  abort(reason: Error): void {
    failed(this.span, reason);
    for (const level of this.#open) level.failure ??= reason;
  }

  /** The session closed: what is still open ends with it. */
  close(statements: number): void {
    for (const level of this.#open.splice(0).reverse()) {
      level.span?.addEvent("rollback");
      level.span?.end();
      level.span = undefined;
    }
    this.span.setAttribute("session.statements", statements);
    this.span.end();
  }
}

/**
 * The `tracing` registry option: `true` for spans from the tracer of the registered
 * OpenTelemetry SDK, or `{ tracer }` for spans from that tracer.
 *
 * @example
 * ```ts
 * const db = createSessionRegistry({ dataSource, tracing: true });
 * ```
 */
export type TracingOption =
  | boolean
  | {
      /** The tracer to start the spans with, such as `trace.getTracer("orders")`. */
      readonly tracer: TracerLike;
    };

/** @internal The `tracing` option, checked. */
export function tracingOption(value: unknown): TracingOption | undefined {
  if (value === undefined || typeof value === "boolean") return value;
  if (typeof value === "object" && value !== null) {
    const tracer = (value as { tracer?: unknown }).tracer;
    if (typeof (tracer as TracerLike | undefined)?.startSpan === "function") return value as TracingOption;
  }
  throw new TypeError(
    `Expected \`tracing\` to be true, false or { tracer } with an OpenTelemetry Tracer, got ${describe(value)}`,
  );
}

function failed(span: SpanLike, error: unknown): void {
  span.recordException(error instanceof Error ? error : String(error));
  span.setStatus({ code: STATUS_ERROR, message: message(error) });
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** OpenTelemetry's `db.system` for the DataSource's driver: the family's name, MySQL's drivers their own. */
function dbSystem(dataSource: DataSource): string {
  const type = String(dataSource.options.type);
  const family = familyOf(dataSource);
  if (family === "postgres" && type !== "cockroachdb") return "postgresql";
  if (family === "sqlite") return "sqlite";
  return type === "aurora-mysql" ? "mysql" : type;
}

/** OpenTelemetry's `db.namespace`: the database's name (SQLite: its file), from the options or the URL. */
function dbNamespace(dataSource: DataSource): string | undefined {
  const all = dataSource.options as { database?: unknown; url?: unknown; replication?: { master?: unknown } };
  // With `replication`, the primary's database (its replicas have the same).
  const options = (all.replication?.master ?? all) as { database?: unknown; url?: unknown };
  if (typeof options.database === "string" && options.database !== "") return options.database;
  if (typeof options.url === "string") {
    try {
      const name = decodeURIComponent(new URL(options.url).pathname.slice(1));
      return name === "" ? undefined : name;
    } catch {
      return undefined;
    }
  }
  return undefined;
}
