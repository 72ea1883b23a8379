/**
 * The HTTP load generator, in a child process of its own so that it does not share the server's event
 * loop: it runs autocannon (programmatic API) for each request it gets over IPC and answers with the figures.
 */
import { createRequire } from "node:module";

export interface LoadRequest {
  readonly id: number;
  readonly url: string;
  readonly connections: number;
  readonly durationS: number;
}

export interface LoadReply {
  readonly id: number;
  readonly rps: number;
  /** Milliseconds. */
  readonly p99: number;
  readonly total: number;
  readonly errors: number;
  readonly non2xx: number;
  readonly error?: string;
}

interface AutocannonResult {
  readonly requests: { readonly total: number };
  readonly latency: { readonly p99: number };
  readonly duration: number;
  readonly errors: number;
  readonly timeouts: number;
  readonly non2xx: number;
}
type Autocannon = (options: {
  url: string;
  connections: number;
  duration: number;
  pipelining: number;
}) => Promise<AutocannonResult>;

const autocannon = createRequire(import.meta.url)("autocannon") as Autocannon;

function send(reply: LoadReply): void {
  process.send?.(reply);
}

process.on("message", (request: LoadRequest) => {
  const started = performance.now();
  autocannon({ url: request.url, connections: request.connections, duration: request.durationS, pipelining: 1 }).then(
    (r) => {
      const seconds = (performance.now() - started) / 1000;
      send({
        id: request.id,
        rps: r.requests.total / seconds,
        p99: r.latency.p99,
        total: r.requests.total,
        errors: r.errors + r.timeouts,
        non2xx: r.non2xx,
      });
    },
    (error: unknown) =>
      send({ id: request.id, rps: NaN, p99: NaN, total: 0, errors: 1, non2xx: 0, error: String(error) }),
  );
});
process.on("disconnect", () => process.exit(0));
