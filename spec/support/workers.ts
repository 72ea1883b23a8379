import { type ChildProcess, type ChildProcessWithoutNullStreams, spawn } from "node:child_process";

/** A child process started by {@link startWorker}. */
export interface StartedWorker<T> {
  readonly child: ChildProcessWithoutNullStreams;
  /** Resolves once the child has printed `ready`. */
  readonly ready: Promise<void>;
  /** Resolves with the JSON line the child prints after `ready` and before exiting with 0; rejects with its stderr otherwise. */
  readonly done: Promise<T>;
}

/**
 * Start `node script ...args` for a multi-process spec: the child prints `ready`, waits for
 * the spec's go on stdin, then prints one JSON line and exits. `children` collects it, so
 * that the spec's afterEach kills what is left.
 */
export function startWorker<T>(script: string, args: string[], children: ChildProcess[]): StartedWorker<T> {
  const child = spawn(process.execPath, [script, ...args]); // stdin, stdout and stderr piped
  children.push(child);
  let out = "";
  let err = "";
  child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
  const ready = new Promise<void>((resolve) =>
    child.stdout.on("data", (chunk: Buffer) => {
      out += chunk.toString();
      if (out.startsWith("ready\n")) resolve();
    }),
  );
  const done = new Promise<T>((resolve, reject) => {
    child.on("error", reject);
    child.on("exit", (code) => {
      if (code !== 0) reject(new Error(`worker ${child.pid} exited with ${code}: ${err}`));
      else resolve(JSON.parse(out.slice("ready\n".length).trim()) as T);
    });
  });
  done.catch(() => undefined); // awaited by the spec; a worker killed after an earlier failure is no news
  return { child, ready, done };
}
