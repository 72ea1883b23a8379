import { createRequire } from "node:module";
import path from "node:path";

/*
 * The part of OpenTelemetry's API this library uses, typed here so that the package's
 * declarations never name `@opentelemetry/api`: it is an optional peer, and an application
 * without it must still type-check. Any copy of the API of major version 1 works: they
 * share the SDK registered in the process through a global.
 */

/**
 * Span attributes as OpenTelemetry takes them.
 *
 * @example
 * ```ts
 * const attributes: TraceAttributes = { "db.system": "postgresql", "session.id": 7 };
 * ```
 */
export type TraceAttributes = Record<string, string | number | boolean>;

/**
 * The span methods this library calls: a structural subset of OpenTelemetry's `Span`.
 *
 * @example
 * ```ts
 * const span: SpanLike = tracer.startSpan("session checkout");
 * span.end();
 * ```
 */
export interface SpanLike {
  /** Set one attribute (`session.statements` at close). */
  setAttribute(key: string, value: string | number | boolean): unknown;
  /** Add an event (`rollback`, `retry`). */
  addEvent(name: string, attributes?: TraceAttributes): unknown;
  /** Set the status: `{ code: 2, message }` (`SpanStatusCode.ERROR`) when the work failed. */
  setStatus(status: { code: number; message?: string }): unknown;
  /** Record the error the work failed with. */
  recordException(exception: Error | string): unknown;
  /** Whether the span records anything (false when the sampler dropped it). */
  isRecording(): boolean;
  /** End the span. */
  end(): void;
}

/**
 * What the `tracing` registry option's `tracer` must be: an OpenTelemetry `Tracer`
 * (`trace.getTracer("my-app")`), typed structurally.
 *
 * @example
 * ```ts
 * import { trace } from "@opentelemetry/api";
 * const db = createSessionRegistry({ dataSource, tracing: { tracer: trace.getTracer("orders") } });
 * ```
 */
export interface TracerLike {
  /** Start a span called `name`, a child of the span in `context` (an OpenTelemetry `Context`). */
  startSpan(name: string, options?: { attributes?: TraceAttributes }, context?: unknown): SpanLike;
}

/** @internal OpenTelemetry's `context` and `trace` APIs, as far as they are used. */
export interface OtelApi {
  readonly context: {
    active(): unknown;
    with<A extends unknown[], R>(context: unknown, fn: (...args: A) => R, thisArg?: unknown, ...args: A): R;
  };
  readonly trace: {
    setSpan(context: unknown, span: SpanLike): unknown;
    getTracerProvider(): {
      getTracer(name: string, version?: string): TracerLike;
      /** On the API's proxy provider: `undefined` while no SDK is registered. */
      getDelegateTracer?(name: string, version?: string): TracerLike | undefined;
    };
  };
}

/** @internal `SpanStatusCode.ERROR`. */
export const STATUS_ERROR = 2;

let loaded: OtelApi | null | undefined;

/**
 * @internal `@opentelemetry/api`, from the application's directory, else from the
 * library's; `undefined` when it is not installed (looked up once).
 */
export function otelApi(cwd = process.cwd()): OtelApi | undefined {
  if (loaded !== undefined) return loaded ?? undefined;
  for (const from of [path.join(cwd, "index.js"), import.meta.filename]) {
    try {
      loaded = createRequire(from)("@opentelemetry/api") as OtelApi;
      return loaded;
    } catch {
      // not installed there
    }
  }
  loaded = null;
  return undefined;
}
