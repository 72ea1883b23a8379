import { execFile } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);
export const root = resolve(import.meta.dirname, "../../..");
const npm = process.platform === "win32" ? "npm.cmd" : "npm";

/** The package's own package.json. */
export const manifest = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as {
  exports: Record<string, unknown>;
  peerDependencies: Record<string, string>;
  typesVersions: Record<string, Record<string, string[]>>;
};

/** Every module subpath users can import: `typeorm-scoped-session`, `typeorm-scoped-session/express`, ... */
export const specifiers = Object.keys(manifest.exports)
  .filter((subpath) => subpath !== "./package.json")
  .map((subpath) => `typeorm-scoped-session${subpath.slice(1)}`);

/**
 * The tools a consumer project has, pinned to the versions users run: TypeScript 5.0 (the
 * oldest supported), 5.7 (the NestJS starter's, also what ts-jest uses) and 7 (native), Jest
 * 29 with ts-jest (the NestJS starter's) in the main directory; Jest 30 in `jest30/`, whose
 * own node_modules keeps Jest 29's hoisted parts out of its way.
 */
const MAIN_TOOLS = [
  // TypeORM as this repository has it (0.3 by default, 1.x in CI's second leg).
  `typeorm@${installedVersion("typeorm")}`,
  `reflect-metadata@${installedVersion("reflect-metadata")}`,
  "@types/node@20",
  "ts50@npm:typescript@~5.0.4",
  "typescript@~5.7.3",
  "ts7@npm:typescript@^7",
  "jest@^29",
  "ts-jest@^29.4",
  "@types/jest@^29",
];
const JEST30_TOOLS = ["jest@^30", "ts-jest@^29.4", "typescript@~5.7.3", "@types/jest@^30"];

function installedVersion(name: string): string {
  return (JSON.parse(readFileSync(join(root, "node_modules", name, "package.json"), "utf8")) as { version: string })
    .version;
}

export interface Packed {
  /** A directory whose node_modules holds the installed tarball, its peers and the tools. */
  readonly dir: string;
  /** The directory of the Jest 30 tools (inside `dir`). */
  readonly jest30: string;
  /** The files in the tarball. */
  readonly files: string[];
}

let packed: Promise<Packed> | undefined;

/**
 * The packed tarball installed as a user gets it, with the tools, once per test run (every
 * packaging spec shares it; it is removed when the process exits).
 */
export function packAndInstall(): Promise<Packed> {
  return (packed ??= install());
}

async function npmInstall(dir: string, names: string[]): Promise<void> {
  await run(npm, ["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", ...names], {
    cwd: dir,
    maxBuffer: 64 * 1024 * 1024,
    timeout: 600_000,
  });
}

async function install(): Promise<Packed> {
  const dir = await mkdtemp(join(tmpdir(), "tss-pack-"));
  process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
  const jest30 = join(dir, "jest30");
  mkdirSync(jest30);
  if (!existsSync(join(root, "dist", "cjs", "index.js"))) throw new Error("Build the package first: npm run build");
  // `npm test` has just built dist/ (pretest): packed as it is, without building it again.
  const { stdout } = await run(npm, ["pack", "--json", "--ignore-scripts", "--pack-destination", dir], {
    cwd: root,
    maxBuffer: 64 * 1024 * 1024,
  });
  const [tarball] = JSON.parse(stdout) as { filename: string; files: { path: string }[] }[];
  writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "consumer", private: true }));
  writeFileSync(join(jest30, "package.json"), JSON.stringify({ name: "consumer-jest30", private: true }));
  await Promise.all([npmInstall(dir, [`./${tarball!.filename}`, ...MAIN_TOOLS]), npmInstall(jest30, JEST30_TOOLS)]);
  // The optional peers (web frameworks, job queue) are taken from this repository's
  // node_modules rather than downloaded again: their types and code are what the subpaths use.
  for (const peer of Object.keys(manifest.peerDependencies)) {
    const target = join(dir, "node_modules", peer);
    if (existsSync(target)) continue;
    mkdirSync(dirname(target), { recursive: true });
    symlinkSync(join(root, "node_modules", peer), target, "dir");
  }
  return { dir, jest30, files: tarball!.files.map((f) => f.path) };
}

/**
 * Runs CPU-bound jobs (compilers, test runners) two at a time, in the order they are queued.
 */
export class Lanes {
  private readonly lanes: Promise<unknown>[] = [Promise.resolve(), Promise.resolve()];
  private next = 0;

  run<T>(job: () => Promise<T>): Promise<T> {
    const lane = this.next++ % this.lanes.length;
    const result = this.lanes[lane]!.then(job);
    this.lanes[lane] = result.catch(() => undefined);
    return result;
  }
}

/** Runs a command, resolving to its output whatever its exit code. */
export async function attempt(
  command: string,
  args: string[],
  options: { cwd: string; env?: NodeJS.ProcessEnv },
): Promise<{ code: number; output: string }> {
  try {
    const { stdout, stderr } = await run(command, args, { ...options, maxBuffer: 64 * 1024 * 1024, timeout: 300_000 });
    return { code: 0, output: stdout + stderr };
  } catch (e) {
    const failure = e as { code?: number; stdout?: string; stderr?: string; message: string };
    return {
      code: typeof failure.code === "number" ? failure.code : 1,
      output: `${failure.stdout ?? ""}${failure.stderr ?? ""}` || failure.message,
    };
  }
}

/** Writes files (paths relative to `dir`), creating their directories. */
export function writeFiles(dir: string, files: Record<string, string>): void {
  for (const [path, content] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, path)), { recursive: true });
    writeFileSync(join(dir, path), content);
  }
}
