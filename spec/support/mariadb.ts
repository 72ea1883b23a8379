/**
 * A throwaway MariaDB server for the specs.
 *
 * `startMariaDbServer()` runs `mariadb-install-db` in a fresh temporary directory and starts `mariadbd` on
 * 127.0.0.1 and a free port (unix socket inside that directory, `root` without a password, no binary log,
 * InnoDB flushing relaxed). As root it passes `--user=root` (mariadbd refuses root otherwise). When the
 * server binaries are missing it prints one line saying why the MariaDB specs are skipped and resolves
 * `undefined`.
 *
 * The server is stopped and its directory removed by `stop()`, and also when the test process exits or is
 * interrupted: an 'exit'/SIGINT/SIGTERM/SIGHUP handler kills it synchronously, and a small watchdog process
 * does the same as soon as the test process is gone, even after a SIGKILL (its stdin is a pipe from us).
 *
 * Set TSS_MARIADB=0 to skip the MariaDB specs; MARIADB_BIN_DIR to a directory holding `mariadbd` and
 * `mariadb-install-db` to choose the binaries.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { delimiter, join } from "node:path";
import mysql from "mysql2/promise";

export interface MariaDbServer {
  readonly host: string;
  readonly port: number;
  /** The server's version, e.g. `10.11.6-MariaDB-0+deb12u1`. */
  readonly version: string;
  /** The temporary directory: data in `data/`, the unix socket, `mariadb.log`. */
  readonly dir: string;
  /** Create a new, empty database and return its URL (`mysql://root@127.0.0.1:PORT/NAME_N`). */
  createDatabase(name?: string): Promise<string>;
  /** Run one statement as root on a connection of its own; resolves the rows. */
  adminQuery<R = Record<string, unknown>>(sql: string, params?: unknown[]): Promise<R[]>;
  /** Stop the server (bounded) and remove its directory. Idempotent. */
  stop(): Promise<void>;
}

const HOST = "127.0.0.1";
const INSTALL_TIMEOUT_MS = 90_000;
const READY_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 10_000;

interface Binaries {
  server: string;
  install: string;
}

/** `mariadbd` (or `mysqld`) and `mariadb-install-db` (or `mysql_install_db`): MARIADB_BIN_DIR, PATH, /usr/sbin, /usr/bin. */
export function findMariaDbBinaries(): Binaries | undefined {
  const dirs = [
    ...(process.env.MARIADB_BIN_DIR ? [process.env.MARIADB_BIN_DIR] : []),
    ...(process.env.PATH ?? "").split(delimiter).filter(Boolean),
    "/usr/sbin",
    "/usr/bin",
  ];
  const find = (names: string[]) =>
    dirs.flatMap((dir) => names.map((name) => join(dir, name))).find((path) => existsSync(path));
  const server = find(["mariadbd", "mysqld"]);
  const install = find(["mariadb-install-db", "mysql_install_db"]);
  return server && install ? { server, install } : undefined;
}

const asRoot = typeof process.getuid === "function" && process.getuid() === 0;

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once("error", reject);
    server.listen(0, HOST, () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => (port ? resolve(port) : reject(new Error("could not find a free port"))));
    });
  });
}

function logTail(dir: string, lines = 15): string {
  try {
    return readFileSync(join(dir, "mariadb.log"), "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no mariadb.log)";
  }
}

function install(binaries: Binaries, dir: string): Promise<void> {
  const args = [
    "--no-defaults",
    `--datadir=${join(dir, "data")}`,
    "--auth-root-authentication-method=normal",
    "--skip-test-db",
    ...(asRoot ? ["--user=root"] : []),
  ];
  return new Promise((resolve, reject) => {
    execFile(binaries.install, args, { timeout: INSTALL_TIMEOUT_MS, cwd: dir }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${binaries.install} failed: ${error.message}\n${String(stdout)}${String(stderr)}`));
      else resolve();
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Clean-up when the process goes away without stop().

interface Live {
  child: ChildProcess;
  watchdog: ChildProcess | undefined;
  dir: string;
}
const live = new Set<Live>();
let handlersInstalled = false;

function killAllSync(): void {
  for (const entry of live) {
    live.delete(entry);
    try {
      if (entry.child.pid && entry.child.exitCode === null && entry.child.signalCode === null) {
        process.kill(entry.child.pid, "SIGKILL"); // a throwaway server: nothing to keep
      }
    } catch {
      // already gone
    }
    try {
      rmSync(entry.dir, { recursive: true, force: true, maxRetries: 2 });
    } catch {
      // left to the watchdog
    }
  }
}

function installExitHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on("exit", killAllSync);
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    const onSignal = () => {
      killAllSync();
      process.off(signal, onSignal);
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
    };
    process.on(signal, onSignal);
  }
}

/** A detached `sh` that kills the server and removes its directory once our end of its stdin closes. */
function startWatchdog(pid: number, dir: string): ChildProcess | undefined {
  const script = ["read -r _ || true", 'kill -KILL "$1" 2>/dev/null', "sleep 0.2", 'rm -rf "$2"'].join("\n");
  try {
    const watchdog = spawn("sh", ["-c", script, "tss-mariadb-watchdog", String(pid), dir], {
      stdio: ["pipe", "ignore", "ignore"],
      detached: true,
    });
    watchdog.on("error", () => {});
    watchdog.stdin?.on("error", () => {});
    watchdog.unref();
    (watchdog.stdin as unknown as { unref?: () => void } | null)?.unref?.();
    return watchdog;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** One query on a connection of its own, closed after. */
async function once<R>(port: number, sql: string, params?: unknown[], connectTimeout = 5_000): Promise<R[]> {
  const connection = await mysql.createConnection({ host: HOST, port, user: "root", connectTimeout });
  try {
    const [rows] = await connection.query(sql, params);
    return rows as R[];
  } finally {
    await connection.end().catch(() => connection.destroy());
  }
}

async function waitReady(port: number, child: ChildProcess, dir: string): Promise<string> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let lastError: unknown;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`mariadbd exited (${child.exitCode ?? child.signalCode}) before it was ready:\n${logTail(dir)}`);
    }
    try {
      const [row] = await once<{ v: string }>(port, "SELECT VERSION() AS v", [], 1_000);
      return row!.v;
    } catch (error) {
      lastError = error;
      await sleep(100);
    }
  }
  throw new Error(`mariadbd was not ready within ${READY_TIMEOUT_MS} ms: ${String(lastError)}\n${logTail(dir)}`);
}

function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.off("exit", onExit);
      resolve(false);
    }, ms);
    const onExit = () => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once("exit", onExit);
  });
}

async function shutdown(entry: Live): Promise<void> {
  live.delete(entry);
  const { child, watchdog } = entry;
  try {
    watchdog?.kill("SIGKILL");
  } catch {
    // gone
  }
  if (child.exitCode !== null || child.signalCode !== null) return;
  try {
    child.kill("SIGKILL");
  } catch {
    return;
  }
  await waitExit(child, STOP_TIMEOUT_MS);
}

function serverArgs(dir: string, port: number): string[] {
  return [
    "--no-defaults",
    ...(asRoot ? ["--user=root"] : []),
    `--datadir=${join(dir, "data")}`,
    `--socket=${join(dir, "sock")}`,
    `--pid-file=${join(dir, "mariadbd.pid")}`,
    `--log-error=${join(dir, "mariadb.log")}`,
    `--port=${port}`,
    `--bind-address=${HOST}`,
    "--skip-name-resolve",
    "--skip-log-bin",
    "--max-connections=300",
    "--innodb-buffer-pool-size=32M",
    "--innodb-flush-log-at-trx-commit=0",
    "--loose-innodb-doublewrite=0",
    "--loose-performance-schema=OFF",
    "--character-set-server=utf8mb4",
  ];
}

let skipReported = false;
function skip(reason: string): undefined {
  if (!skipReported) console.log(`[mariadb] MariaDB specs skipped: ${reason}`);
  skipReported = true;
  return undefined;
}

/**
 * Start a throwaway server. Resolves `undefined` (after printing one line why) when MariaDB is not
 * available here; rejects when it is available but fails to start.
 */
export async function startMariaDbServer(): Promise<MariaDbServer | undefined> {
  if (process.env.TSS_MARIADB === "0") return skip("TSS_MARIADB=0");
  const binaries = findMariaDbBinaries();
  if (!binaries) {
    return skip(
      "no `mariadbd` and `mariadb-install-db` on PATH, in MARIADB_BIN_DIR, /usr/sbin or /usr/bin " +
        "(apt-get install --no-install-recommends mariadb-server)",
    );
  }
  // Short: the socket path must fit in 107 bytes.
  const dir = mkdtempSync("/tmp/tss-my-");
  installExitHandlers();
  try {
    await install(binaries, dir);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  let lastError: unknown;
  // The free port can be taken between our probe and the server's bind: try a few.
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const out = openSync(join(dir, "mariadbd.out"), "a");
    let child: ChildProcess;
    try {
      child = spawn(binaries.server, serverArgs(dir, port), {
        cwd: dir,
        stdio: ["ignore", out, out],
        detached: true,
        env: { ...process.env, TZ: "UTC" },
      });
    } finally {
      closeSync(out);
    }
    child.on("error", (error) => (lastError = error));
    child.unref();
    const entry: Live = { child, watchdog: undefined, dir };
    live.add(entry);
    if (child.pid) entry.watchdog = startWatchdog(child.pid, dir);
    try {
      const version = await waitReady(port, child, dir);
      return makeServer(entry, port, version);
    } catch (error) {
      lastError = error;
      await shutdown(entry);
      if (/bind|address already in use/i.test(logTail(dir, 50)) && attempt < 2) continue;
      break;
    }
  }
  rmSync(dir, { recursive: true, force: true });
  throw lastError instanceof Error ? lastError : new Error(String(lastError));
}

function makeServer(entry: Live, port: number, version: string): MariaDbServer {
  let counter = 0;
  let stopping: Promise<void> | undefined;
  return {
    host: HOST,
    port,
    version,
    dir: entry.dir,
    adminQuery: (sql, params) => once(port, sql, params),
    async createDatabase(name = "db") {
      const base =
        name
          .toLowerCase()
          .replace(/[^a-z0-9_]+/g, "_")
          .slice(0, 40) || "db";
      const database = `${base}_${++counter}`;
      await once(port, `CREATE DATABASE \`${database}\` CHARACTER SET utf8mb4`);
      return `mysql://root@${HOST}:${port}/${database}`;
    },
    stop: () =>
      (stopping ??= (async () => {
        await shutdown(entry);
        rmSync(entry.dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
      })()),
  };
}
