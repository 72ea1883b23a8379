/**
 * The `tracing` registry option with the OpenTelemetry SDK, on embedded SQLite: no server,
 * no collector. Run it after `npm run pretest` with `node build/examples/tracing.js`.
 *
 * It registers a tracer provider that prints every finished span (`ConsoleSpanExporter`)
 * and also keeps them (`InMemorySpanExporter`), runs a small unit of work — a named
 * transaction with a savepoint that fails and is caught, a block retried once, a query
 * outside any transaction — and ends with the spans as an indented tree.
 */
import "reflect-metadata";
import { SpanStatusCode, trace } from "@opentelemetry/api";
import {
  ConsoleSpanExporter,
  InMemorySpanExporter,
  NodeTracerProvider,
  type ReadableSpan,
  SimpleSpanProcessor,
} from "@opentelemetry/sdk-trace-node";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";
import { createSessionRegistry } from "typeorm-scoped-session";

@Entity("orders")
class Order {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  item!: string;

  @Column("integer", { default: 0 })
  reserved!: number;
}

/** Stands for a serialization failure: the kind of error `retry` is for. */
class WriteConflict extends Error {}

// The SDK first: with `tracing: true` sessions get spans only while an SDK is registered.
// (Without one, the option makes no span and costs nothing.)
const memory = new InMemorySpanExporter();
const provider = new NodeTracerProvider({
  spanProcessors: [new SimpleSpanProcessor(new ConsoleSpanExporter()), new SimpleSpanProcessor(memory)],
});
provider.register(); // the global tracer provider, and an AsyncLocalStorage context manager

const db = createSessionRegistry({ url: "sqlite::memory:", entities: [Order], synchronize: true, tracing: true });
const tracer = trace.getTracer("tracing-example");

async function unitOfWork(): Promise<void> {
  // A named transaction; the nested block is a SAVEPOINT whose failure undoes only its own work.
  await db.withTransaction(
    async (s) => {
      await s.getRepository(Order).save({ item: "tea" });
      await db
        .withTransaction(async (inner) => {
          await inner.getRepository(Order).save({ item: "cake" });
          throw new Error("inner failure");
        })
        .catch((error: Error) => console.log(`caught: ${error.message}`));
    },
    { name: "checkout" },
  );

  // A retried block: attempt 1 fails with a conflict, attempt 2 commits. Each attempt is a session of its own.
  let attempts = 0;
  await db.withTransaction(
    async (s) => {
      attempts += 1;
      await s.getRepository(Order).increment({ item: "tea" }, "reserved", 1);
      // The application's own spans nest under the transaction's.
      await tracer.startActiveSpan("check stock", async (span) => {
        span.end();
      });
      if (attempts === 1) throw new WriteConflict("write conflict");
    },
    { name: "reserve", retry: { retries: 2, baseDelayMs: 1, retryOn: (error) => error instanceof WriteConflict } },
  );

  // A query outside any transaction: the session's span only.
  const count = await db.withSession((s) => s.getRepository(Order).count(), { name: "count" });
  console.log(`orders: ${count}, reserve attempts: ${attempts}`);
}

/** One line per span, children indented under their parent, in the order they started. */
function spanTree(spans: ReadableSpan[]): string[] {
  const ids = new Set(spans.map((span) => span.spanContext().spanId));
  const children = new Map<string | undefined, ReadableSpan[]>();
  for (const span of spans) {
    const parent = span.parentSpanContext?.spanId;
    const key = parent !== undefined && ids.has(parent) ? parent : undefined;
    children.set(key, [...(children.get(key) ?? []), span]);
  }
  const started = (span: ReadableSpan) => span.startTime[0] * 1e9 + span.startTime[1];
  const lines: string[] = [];
  const walk = (parent: string | undefined, depth: number): void => {
    for (const span of (children.get(parent) ?? []).sort((a, b) => started(a) - started(b))) {
      lines.push(`${"  ".repeat(depth)}${describeSpan(span)}`);
      walk(span.spanContext().spanId, depth + 1);
    }
  };
  walk(undefined, 0);
  return lines;
}

/** A span's name, chosen attributes, events and error status, on one line. */
function describeSpan(span: ReadableSpan): string {
  const shown = ["session.id", "session.statements", "retry.attempt"];
  const attributes = shown
    .filter((key) => span.attributes[key] !== undefined)
    .map((key) => `${key}=${String(span.attributes[key])}`);
  const events = span.events.filter((event) => event.name !== "exception").map((event) => `[${event.name}]`);
  const status = span.status.code === SpanStatusCode.ERROR ? `ERROR ${span.status.message ?? ""}` : "";
  return [span.name, attributes.length > 0 ? `(${attributes.join(", ")})` : "", ...events, status]
    .filter((part) => part !== "")
    .join("  ");
}

try {
  await tracer.startActiveSpan("order job", async (job) => {
    try {
      await unitOfWork();
    } finally {
      job.end();
    }
  });
} finally {
  await db.drain({ destroy: true });
}

// Read the spans before shutting the provider down: the in-memory exporter forgets them then.
const spans = memory.getFinishedSpans();
await provider.shutdown();
console.log("\nSpan tree (db.system and db.namespace are on every session span):");
for (const line of spanTree(spans)) console.log(`  ${line}`);
