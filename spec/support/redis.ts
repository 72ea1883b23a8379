/**
 * A throwaway Redis server for the BullMQ specs.
 *
 * `startRedis()` runs Debian's `redis-server` on 127.0.0.1 and a free port, without
 * persistence (`--save "" --appendonly no`), in a fresh temporary directory. It starts
 * lazily, from the `before` hook of the specs that need it. When the binary is missing it
 * prints one line saying why the Redis specs are skipped and resolves `undefined`.
 *
 * The server runs under a small shell that reads its stdin, a pipe from the test process:
 * when the test process exits, however it dies (SIGKILL included), the pipe closes and the
 * shell stops the server. `stop()` does the same on purpose, bounded.
 *
 * Set TSS_REDIS=0 to skip the Redis specs; REDIS_SERVER to the path of `redis-server`
 * to choose the binary.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";

export interface RedisServer {
  readonly host: string;
  readonly port: number;
  /** `redis://127.0.0.1:PORT` */
  readonly url: string;
  /** Stop the server (bounded) and remove its directory. Idempotent. */
  stop(): Promise<void>;
}

const HOST = "127.0.0.1";
const READY_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 5_000;

/** `redis-server`: REDIS_SERVER, then PATH, then Debian's /usr/bin and /usr/sbin. */
export function findRedisServer(): string | undefined {
  const given = process.env.REDIS_SERVER;
  if (given !== undefined && given !== "") return existsSync(given) ? given : undefined;
  const dirs = [...(process.env.PATH ?? "").split(delimiter), "/usr/bin", "/usr/sbin", "/usr/local/bin"];
  return dirs.map((dir) => join(dir, "redis-server")).find((file) => existsSync(file));
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, HOST, () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** The shell that owns the server: it stops it and removes its directory once its stdin (our pipe) closes. */
const OWNER =
  'bin="$1"; dir="$2"; shift 2; "$bin" "$@" & pid=$!; trap \'kill $pid\' TERM; cat >/dev/null; kill $pid; wait $pid; rm -rf "$dir"';

/** Wait until the server logs that it accepts connections; reject when it exits or after a bound. */
function ready(child: ChildProcess, output: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => done(new Error(`redis-server not ready after ${READY_TIMEOUT_MS} ms`)),
      READY_TIMEOUT_MS,
    );
    const onData = (chunk: Buffer): void => {
      output.push(chunk.toString());
      if (/Ready to accept connections/.test(output.join(""))) done();
    };
    const onExit = (code: number | null): void => done(new Error(`redis-server exited (code ${code})`));
    const done = (error?: Error): void => {
      clearTimeout(timer);
      child.stdout?.off("data", onData);
      child.off("exit", onExit);
      if (error === undefined) resolve();
      else reject(new Error(`${error.message}:\n${output.join("").split("\n").slice(-15).join("\n")}`));
    };
    child.stdout?.on("data", onData);
    child.once("exit", onExit);
  });
}

/** Start a server; `undefined` (after one line saying why) where Redis cannot run here. */
export async function startRedis(): Promise<RedisServer | undefined> {
  if (process.env.TSS_REDIS === "0") {
    console.log("  (Redis specs skipped: TSS_REDIS=0)");
    return undefined;
  }
  const binary = findRedisServer();
  if (binary === undefined) {
    console.log("  (Redis specs skipped: no redis-server binary; apt-get install redis-server, or set REDIS_SERVER)");
    return undefined;
  }
  const port = await freePort();
  const tmp = mkdtempSync(join(tmpdir(), "tss-redis-"));
  const args = ["--port", String(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", tmp];
  const child = spawn("sh", ["-c", OWNER, "sh", binary, tmp, ...args, "--logfile", ""], {
    stdio: ["pipe", "pipe", "pipe"],
    detached: true, // a process group of its own, to kill the shell and the server together
  });
  const output: string[] = [];
  child.stderr?.on("data", (chunk: Buffer) => output.push(chunk.toString()));
  let stopped: Promise<void> | undefined;
  const killGroup = (): void => {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
    } catch {
      // already gone
    }
  };
  const onExit = (): void => {
    killGroup();
    rmSync(tmp, { recursive: true, force: true });
  };
  process.once("exit", onExit);
  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      process.off("exit", onExit);
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
        child.stdin?.end();
        const timer = setTimeout(killGroup, STOP_TIMEOUT_MS);
        await exited;
        clearTimeout(timer);
      }
      rmSync(tmp, { recursive: true, force: true });
    })());
  try {
    await ready(child, output);
  } catch (error) {
    await stop();
    throw error;
  }
  child.stdout?.resume(); // keep reading, so that the server never blocks on a full pipe
  return { host: HOST, port, url: `redis://${HOST}:${port}`, stop };
}
