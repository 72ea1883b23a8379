/**
 * The child process of the statement-span spec in ../tracing.spec.ts: run as
 * `node tracing-pg-worker.js <postgres-url>`.
 *
 * OpenTelemetry's pg instrumentation patches `pg` when it is required, so it must be
 * registered before TypeORM loads the driver: mocha's own process loaded `pg` long
 * before (the PostgreSQL root hooks use it), hence a process of its own. It registers a
 * NodeTracerProvider (with its AsyncLocalStorage context manager) and the pg
 * instrumentation first, and only then imports TypeORM and the library. Then, on a
 * registry with `tracing: true`, it runs a transactional block with a query, a nested
 * block (a savepoint) with a query, and a `withSession` block with a query outside any
 * transaction. It prints one JSON line: every finished span as {@link FinishedSpan}.
 */
import { registerInstrumentations } from "@opentelemetry/instrumentation";
import { PgInstrumentation } from "@opentelemetry/instrumentation-pg";
import { InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { NodeTracerProvider } from "@opentelemetry/sdk-trace-node";

/** A finished span as the worker prints it. */
export interface FinishedSpan {
  name: string;
  traceId: string;
  spanId: string;
  parentSpanId: string | undefined;
  attributes: Record<string, unknown>;
}

const [url] = process.argv.slice(2);
if (url === undefined) throw new Error("usage: tracing-pg-worker.js <postgres-url>");

const exporter = new InMemorySpanExporter();
const provider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
provider.register();
registerInstrumentations({ instrumentations: [new PgInstrumentation()] });

// Only now: TypeORM requires `pg` when the DataSource is made, and gets the patched one.
const { DataSource } = await import("typeorm");
const { createSessionRegistry } = await import("../../src/index.js");

const dataSource = new DataSource({ type: "postgres", url, extra: { max: 2 } });
const db = createSessionRegistry({ name: "tracing-pg-worker", dataSource, tracing: true });
try {
  await db.withTransaction(
    async (s) => {
      await s.query("SELECT 1 AS in_transaction");
      await db.withTransaction((inner) => inner.query("SELECT 2 AS in_savepoint"));
    },
    { name: "tx" },
  );
  await db.withSession((s) => s.query("SELECT 3 AS outside_transaction"), { name: "plain" });
} finally {
  await db.drain({ destroy: true });
}
await provider.forceFlush();
const spans: FinishedSpan[] = exporter.getFinishedSpans().map((span) => ({
  name: span.name,
  traceId: span.spanContext().traceId,
  spanId: span.spanContext().spanId,
  parentSpanId: span.parentSpanContext?.spanId,
  attributes: { ...span.attributes },
}));
await provider.shutdown();
process.stdout.write(`${JSON.stringify(spans)}\n`);
