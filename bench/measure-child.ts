/**
 * The block and HTTP measurements on one Node binary, in a process of its own, so that `npm run bench` can put
 * several Node versions side by side: `node measure-child.js '<MeasureRequest as JSON>'` (forked by
 * {@link runMeasure} with the binary as `execPath`); the figures go back to the parent over IPC. The databases
 * are prepared (tables, seed rows) by the parent; this process only opens its DataSources on them.
 */
import { initializeTransactionalContext, StorageDriver } from "typeorm-transactional";
import { openBackend, type Backend } from "./backends.js";
import { runHttp, type HttpOptions, type HttpSamples } from "./http.js";
import { runInProcess } from "./inprocess.js";
import { runTracing, type TracingChild, type TracingReply } from "./tracing.js";

export interface MeasureRequest {
  /** `blocks`: the in-process table; `http`: the Express table; `tracing`: the cost of the `tracing` option. */
  readonly part: "blocks" | "http" | "tracing";
  /** With `part: "tracing"`: whether this child registers the in-memory OpenTelemetry SDK (`sdk`). */
  readonly tracing?: TracingChild;
  readonly sqliteFile: string;
  /** Absent: PostgreSQL is skipped. */
  readonly pgUrl?: string;
  readonly rounds: number;
  readonly batchMs: number;
  readonly http: HttpOptions;
}

export interface MeasureReply {
  /** `process.version` of the child. */
  readonly node: string;
  /** The in-process samples (`Samples` as entries). */
  readonly samples?: [string, number[]][];
  /** The HTTP results (`HttpResults` as entries). */
  readonly http?: [string, HttpSamples][];
  readonly tracing?: TracingReply;
  readonly error?: string;
}

const log = (line: string) => console.error(`  [node ${process.version}] ${line.trimStart()}`);

async function main(request: MeasureRequest): Promise<MeasureReply> {
  if (request.part === "tracing") {
    // Its own DataSources (SQLite in memory, and the bench's PostgreSQL); typeorm-transactional is not involved.
    const child = request.tracing ?? "plain";
    log(`tracing (${child === "sdk" ? "in-memory SDK registered" : "no SDK"}): ${request.rounds} rounds`);
    const options = { rounds: request.rounds, batchMs: request.batchMs };
    return { node: process.version, tracing: await runTracing(child, request.pgUrl, options, log) };
  }
  // Both AsyncLocalStorages (ours and typeorm-transactional's) are enabled for every row, the floor's too.
  initializeTransactionalContext({ storageDriver: StorageDriver.ASYNC_LOCAL_STORAGE });
  const backends: Backend[] = [];
  try {
    backends.push(await openBackend("sqlite", request.sqliteFile, { tt: true, seed: false }));
    if (request.pgUrl !== undefined) backends.push(await openBackend("postgres", request.pgUrl, { tt: true, seed: false })); // prettier-ignore
    if (request.part === "blocks") {
      log(`in-process scenarios: ${request.rounds} rounds`);
      const samples = await runInProcess(backends, { rounds: request.rounds, batchMs: request.batchMs }, log);
      return { node: process.version, samples: [...samples] };
    }
    log(`HTTP: ${request.http.rounds} rounds of ${request.http.durationS} s per implementation`);
    const http = await runHttp(backends, request.http, log);
    return { node: process.version, http: [...http] };
  } finally {
    for (const b of backends) await b.dispose().catch((error: unknown) => log(`dispose: ${String(error)}`));
  }
}

main(JSON.parse(process.argv[2] ?? "null") as MeasureRequest).then(
  (reply) => process.send?.(reply, () => process.exit(0)),
  (error: unknown) => {
    const reply: MeasureReply = {
      node: process.version,
      error: error instanceof Error ? (error.stack ?? error.message) : String(error),
    };
    process.send?.(reply, () => process.exit(1));
  },
);
