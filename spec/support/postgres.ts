/**
 * A throwaway PostgreSQL cluster for the specs.
 *
 * `startPostgres()` runs `initdb` in a fresh temporary directory and starts `postgres` on 127.0.0.1 and a
 * free port (unix socket inside that directory, trust auth, fsync off). As root it runs both as the
 * `postgres` OS user (initdb refuses root); otherwise as the current user. When the server binaries are
 * missing it prints one line saying why the PostgreSQL specs are skipped and resolves `undefined`.
 *
 * The server is stopped and its directory removed by `stop()`, and also when the test process exits or is
 * interrupted: an 'exit'/SIGINT/SIGTERM/SIGHUP handler kills it synchronously, and a small watchdog process
 * does the same as soon as the test process is gone, even after a SIGKILL (its stdin is a pipe from us).
 *
 * `startPostgres({ replication: true })` starts a cluster that can be the primary of a streaming standby
 * (see ./postgres-replica.ts); the default stays the fastest setup (wal_level=minimal, no WAL senders).
 *
 * Set TSS_POSTGRES=0 to skip the PostgreSQL specs; PG_BIN_DIR to a directory holding `initdb` and `postgres`
 * to choose the binaries.
 */
import "reflect-metadata";
import { execFile, spawn, spawnSync, type ChildProcess } from "node:child_process";
import {
  appendFileSync,
  chownSync,
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import pg from "pg";
import { DataSource, type DataSourceOptions } from "typeorm";

export interface PgServer {
  /** `postgres://postgres@127.0.0.1:PORT/DATABASE`: the test database created at start. */
  readonly url: string;
  readonly host: string;
  readonly port: number;
  readonly database: string;
  /** The temporary directory: data in `data/`, the unix socket, `postgres.log`. */
  readonly dir: string;
  /** Create a new, empty database and return its URL. Names get a unique suffix. */
  createDatabase(name?: string): Promise<string>;
  /** Run one statement as the superuser on the `postgres` database; resolves the rows. */
  adminQuery<R extends Record<string, unknown> = Record<string, unknown>>(
    sql: string,
    params?: unknown[],
  ): Promise<R[]>;
  /** Stop the server (immediate shutdown, bounded) and remove its directory. Idempotent. */
  stop(): Promise<void>;
}

/**
 * How to start a cluster with {@link startPostgres}.
 *
 * @example
 * const primary = await startPostgres({ replication: true });
 */
export interface StartPostgresOptions {
  /**
   * Make the cluster able to feed a streaming standby: wal_level=replica, max_wal_senders=5, hot_standby=on,
   * and replication connections from 127.0.0.1 allowed (trust). Slower to write than the default. Default false.
   */
  readonly replication?: boolean;
}

/**
 * The address every server listens on, and the superuser the specs connect as.
 *
 * @example
 * const url = `postgres://${USER}@${HOST}:${port}/postgres`;
 */
export const HOST = "127.0.0.1";
/** {@inheritDoc HOST} */
export const USER = "postgres";
const TEST_DATABASE = "tss_test";
const READY_TIMEOUT_MS = 20_000;
const INITDB_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;

/**
 * A directory holding both `initdb` and `postgres`: PG_BIN_DIR, then PATH, then Debian's /usr/lib/postgresql/N/bin.
 *
 * @example
 * const binDir = findPostgresBinDir(); // "/usr/lib/postgresql/15/bin", or undefined
 */
export function findPostgresBinDir(): string | undefined {
  const has = (dir: string) => existsSync(join(dir, "initdb")) && existsSync(join(dir, "postgres"));
  const candidates: string[] = [];
  if (process.env.PG_BIN_DIR) candidates.push(process.env.PG_BIN_DIR);
  candidates.push(...(process.env.PATH ?? "").split(delimiter).filter(Boolean));
  try {
    const versions = readdirSync("/usr/lib/postgresql")
      .filter((v) => /^\d+$/.test(v))
      .sort((a, b) => Number(b) - Number(a));
    candidates.push(...versions.map((v) => `/usr/lib/postgresql/${v}/bin`));
  } catch {
    // not Debian-style, or not installed
  }
  return candidates.find(has);
}

/**
 * The OS user the server tools run as: empty when we run them as ourselves.
 *
 * @example
 * const runAs: RunAs = { uid: 101, gid: 104 }; // root running the tools as `postgres`
 */
export interface RunAs {
  uid?: number;
  gid?: number;
}

let runAsLookup: { result: RunAs | undefined } | undefined;

/** As root: the uid/gid of the `postgres` OS user (undefined when there is none). Otherwise: run as we are. */
function whoRunsPostgres(): RunAs | undefined {
  if (typeof process.getuid !== "function" || process.getuid() !== 0) return {};
  // Asked once per process: a replicated pair needs the answer for each of its servers.
  if (runAsLookup) return runAsLookup.result;
  const id = (flag: string) => {
    const r = spawnSync("id", [flag, USER], { encoding: "utf8", timeout: 5_000 });
    return r.status === 0 ? Number(r.stdout.trim()) : NaN;
  };
  const uid = id("-u");
  const gid = id("-g");
  runAsLookup = { result: Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined };
  return runAsLookup.result;
}

/**
 * What starting a server here needs: where the binaries are, and as whom to run them.
 *
 * @example
 * const { binDir, runAs }: PostgresPrerequisites = postgresPrerequisites()!;
 */
export interface PostgresPrerequisites {
  readonly binDir: string;
  readonly runAs: RunAs;
}

/**
 * The binaries and the OS user for a server, or `undefined` (after printing one line why, once per process)
 * when the PostgreSQL specs cannot run here.
 *
 * @example
 * const pre = postgresPrerequisites();
 * if (pre) console.log(join(pre.binDir, "pg_basebackup"));
 */
export function postgresPrerequisites(): PostgresPrerequisites | undefined {
  if (process.env.TSS_POSTGRES === "0") return skip("TSS_POSTGRES=0");
  const binDir = findPostgresBinDir();
  if (!binDir) {
    return skip(
      "no `initdb`/`postgres` on PATH, in PG_BIN_DIR or in /usr/lib/postgresql/*/bin (apt-get install postgresql-15)",
    );
  }
  const runAs = whoRunsPostgres();
  if (!runAs) return skip(`running as root and there is no \`${USER}\` OS user to run the server as`);
  return { binDir, runAs };
}

/** A port that was free a moment ago (bind port 0, read it, close). */
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

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * The `-c` settings of a server: made for throwaway test data (no fsync, no autovacuum). With `replication`
 * it writes enough WAL for, and accepts, streaming standbys; a standby gets the same settings, since hot
 * standby refuses to run with fewer WAL senders than its primary.
 *
 * @example
 * serverSettings(true); // [..., "wal_level=replica", "max_wal_senders=5", "hot_standby=on", ...]
 */
export function serverSettings(replication: boolean): string[] {
  return [
    "max_connections=100",
    "shared_buffers=16MB",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    ...(replication
      ? ["wal_level=replica", "max_wal_senders=5", "hot_standby=on"]
      : ["wal_level=minimal", "max_wal_senders=0"]),
    "autovacuum=off",
    "log_min_messages=warning",
    "log_destination=stderr",
  ];
}

/** The environment for initdb and postgres: ours without PG* variables, with the C locale. */
function serverEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("PG")) env[k] = v;
  return { ...env, LC_ALL: "C", LANG: "C", TZ: "UTC" };
}

function logTail(dir: string, lines = 15): string {
  try {
    return readFileSync(join(dir, "postgres.log"), "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no postgres.log)";
  }
}

/**
 * A temporary directory the server's user can reach; short, since the socket path must fit in 107 bytes.
 *
 * @example
 * const dir = makeTempDir(pre.runAs); // "/tmp/tss-pg-AbC123", owned by the server's user
 */
export function makeTempDir(runAs: RunAs): string {
  let base = tmpdir();
  // The postgres user must be able to traverse the parent; the socket path "<dir>/.s.PGSQL.NNNNN" must be short.
  const traversable = runAs.uid === undefined || (statSync(base).mode & 0o001) !== 0;
  if (!traversable || base.length > 60) base = "/tmp";
  const dir = mkdtempSync(join(base, "tss-pg-"));
  if (runAs.uid !== undefined && runAs.gid !== undefined) chownSync(dir, runAs.uid, runAs.gid);
  return dir;
}

/**
 * Run a server tool (initdb, pg_basebackup) as the server's user, bounded by `timeout` ms; rejects with its output.
 *
 * @example
 * await execFileBounded(join(binDir, "pg_basebackup"), ["--version"], runAs, 5_000);
 */
export function execFileBounded(file: string, args: string[], runAs: RunAs, timeout: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { ...runAs, env: serverEnv(), timeout, cwd: "/" }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} failed: ${error.message}\n${String(stdout)}${String(stderr)}`));
      else resolve();
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Clean-up when the process goes away without stop(): every live server is registered here.

/**
 * One running server, known to the clean-up at exit (see {@link launchServer}).
 *
 * @example
 * const { entry }: { entry: Live } = await launchServer(binDir, runAs, dir, serverSettings(false));
 */
export interface Live {
  child: ChildProcess;
  watchdog: ChildProcess | undefined;
  dir: string;
}
const live = new Set<Live>();
let handlersInstalled = false;

/** Synchronous: ask each server for an immediate shutdown and remove what can be removed now. */
function killAllSync(): void {
  for (const entry of live) {
    live.delete(entry);
    try {
      if (entry.child.pid && entry.child.exitCode === null && entry.child.signalCode === null) {
        process.kill(entry.child.pid, "SIGQUIT");
      }
    } catch {
      // already gone
    }
    // The server may still be writing: the watchdog removes the rest once it is down.
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
      // Let whoever else listens handle it; if nobody does, die of the signal as we would have without us.
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
    };
    process.on(signal, onSignal);
  }
}

/**
 * A detached `sh` whose stdin is a pipe from us: when we die (however), it reads EOF, shuts the server
 * down (SIGQUIT, then SIGKILL after ~5 s if it is still there) and removes the directory. stop() kills it
 * first, so it only ever acts for a test process that did not stop its server.
 */
function startWatchdog(pid: number, dir: string): ChildProcess | undefined {
  const script = [
    "read -r _ || true",
    'kill -QUIT "$1" 2>/dev/null',
    "i=0",
    'while [ "$i" -lt 50 ] && [ -e "$2/data/postmaster.pid" ] && kill -0 "$1" 2>/dev/null; do sleep 0.1; i=$((i+1)); done',
    '[ -e "$2/data/postmaster.pid" ] && kill -KILL "$1" 2>/dev/null',
    'rm -rf "$2"',
  ].join("\n");
  try {
    const watchdog = spawn("sh", ["-c", script, "tss-pg-watchdog", String(pid), dir], {
      stdio: ["pipe", "ignore", "ignore"],
      detached: true,
    });
    watchdog.on("error", () => {});
    watchdog.stdin?.on("error", () => {});
    watchdog.unref();
    // The pipe must not keep the test process alive.
    (watchdog.stdin as unknown as { unref?: () => void } | null)?.unref?.();
    return watchdog;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------

/** Wait until a client can connect and run a query; bounded by `deadline`; fails early if the server exits. */
async function waitReady(port: number, child: ChildProcess, dir: string, deadline: number): Promise<void> {
  let lastError: unknown;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`postgres exited (${child.exitCode ?? child.signalCode}) before it was ready:\n${logTail(dir)}`);
    }
    const client = new pg.Client({
      host: HOST,
      port,
      user: USER,
      database: "postgres",
      connectionTimeoutMillis: 1_000,
    });
    client.on("error", () => {});
    try {
      await client.connect();
      await client.query("SELECT 1");
      await client.end();
      return;
    } catch (error) {
      lastError = error;
      await client.end().catch(() => {});
      await sleep(50);
    }
  }
  throw new Error(`postgres was not ready within ${READY_TIMEOUT_MS} ms: ${String(lastError)}\n${logTail(dir)}`);
}

/** Resolve when the child has exited, or after `ms` (then false). */
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

let skipReported = false;
function skip(reason: string): undefined {
  if (!skipReported) console.log(`[postgres] PostgreSQL specs skipped: ${reason}`);
  skipReported = true;
  return undefined;
}

/**
 * Start a throwaway cluster. Resolves `undefined` (after printing one line why) when PostgreSQL is not
 * available here; rejects when it is available but fails to start.
 *
 * @example
 * const server = await startPostgres();
 * if (server) {
 *   const url = await server.createDatabase("orders");
 *   // ...
 *   await server.stop();
 * }
 */
export async function startPostgres(options: StartPostgresOptions = {}): Promise<PgServer | undefined> {
  const pre = postgresPrerequisites();
  if (!pre) return undefined;
  const { binDir, runAs } = pre;
  const replication = options.replication === true;

  const dir = makeTempDir(runAs);
  const dataDir = join(dir, "data");
  installExitHandlers();
  try {
    await execFileBounded(
      join(binDir, "initdb"),
      ["-D", dataDir, "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
      runAs,
      INITDB_TIMEOUT_MS,
    );
    if (replication) allowReplicationFromLocalhost(dataDir);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  const { entry, port } = await launchServer(binDir, runAs, dir, serverSettings(replication));
  return makeServer(entry, port);
}

/** initdb's `-A trust` pg_hba.conf already has this line (PostgreSQL 10+); add it where it does not. */
function allowReplicationFromLocalhost(dataDir: string): void {
  const hba = join(dataDir, "pg_hba.conf");
  const line = /^\s*host\s+replication\s+all\s+127\.0\.0\.1\/32\s+trust\s*$/m;
  if (!line.test(readFileSync(hba, "utf8"))) appendFileSync(hba, `\nhost replication all ${HOST}/32 trust\n`);
}

/**
 * Start `postgres` on the data directory `<dir>/data` (made by initdb or pg_basebackup) on 127.0.0.1 and a
 * free port, registered for the clean-up at exit, and wait until it answers. On failure the server is
 * down and `dir` removed.
 *
 * @example
 * const { entry, port } = await launchServer(binDir, runAs, dir, serverSettings(true));
 */
export async function launchServer(
  binDir: string,
  runAs: RunAs,
  dir: string,
  settings: readonly string[],
): Promise<{ entry: Live; port: number }> {
  installExitHandlers();
  const dataDir = join(dir, "data");
  // The free port can be taken between our probe and the server's bind: try a few.
  let lastError: unknown;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const log = openSync(join(dir, "postgres.log"), "a");
    if (runAs.uid !== undefined && runAs.gid !== undefined) chownSync(join(dir, "postgres.log"), runAs.uid, runAs.gid);
    let child: ChildProcess;
    try {
      child = spawn(
        join(binDir, "postgres"),
        [
          "-D", dataDir,
          "-p", String(port),
          "-k", dir,
          "-c", `listen_addresses=${HOST}`,
          ...settings.flatMap((setting) => ["-c", setting]),
        ], // prettier-ignore
        { ...runAs, env: serverEnv(), cwd: "/", stdio: ["ignore", log, log], detached: true },
      );
    } finally {
      closeSync(log);
    }
    child.on("error", (error) => (lastError = error));
    child.unref();
    const entry: Live = { child, watchdog: undefined, dir };
    live.add(entry);
    if (child.pid) entry.watchdog = startWatchdog(child.pid, dir);

    try {
      await waitReady(port, child, dir, Date.now() + READY_TIMEOUT_MS);
    } catch (error) {
      lastError = error;
      await shutdown(entry);
      if (/could not bind|address already in use/i.test(logTail(dir, 50)) && attempt < 2) continue;
      rmSync(dir, { recursive: true, force: true });
      throw error;
    }
    return { entry, port };
  }
  rmSync(dir, { recursive: true, force: true });
  throw lastError instanceof Error ? lastError : new Error(String(lastError));
}

/** Immediate shutdown of one server, bounded; SIGKILL if it does not go. Leaves the directory. */
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
    child.kill("SIGQUIT"); // = pg_ctl stop -m immediate
  } catch {
    return;
  }
  if (await waitExit(child, STOP_TIMEOUT_MS)) return;
  try {
    child.kill("SIGKILL");
  } catch {
    // gone
  }
  await waitExit(child, 2_000);
}

/**
 * A running server as the specs use it, without anything that needs it to be writable (see {@link serverHandle}).
 *
 * @example
 * const handle: ServerHandle = serverHandle(entry, port);
 */
export interface ServerHandle {
  readonly host: string;
  readonly port: number;
  readonly dir: string;
  /** `postgres://postgres@127.0.0.1:PORT/<database>`. */
  urlOf(database: string): string;
  adminQuery: PgServer["adminQuery"];
  /** Close the admin pool, stop the server (immediate shutdown, bounded), remove its directory. Idempotent. */
  stop(): Promise<void>;
}

/**
 * The admin pool and the stop() of a server started by {@link launchServer}. Works on a standby as well.
 *
 * @example
 * const handle = serverHandle(entry, port);
 * await handle.adminQuery("SELECT pg_is_in_recovery()");
 * await handle.stop();
 */
export function serverHandle(entry: Live, port: number): ServerHandle {
  // Admin connections: few, and never keeping the process alive when idle.
  const admin = new pg.Pool({
    host: HOST,
    port,
    user: USER,
    database: "postgres",
    max: 2,
    idleTimeoutMillis: 1_000,
    connectionTimeoutMillis: 5_000,
    allowExitOnIdle: true,
  });
  admin.on("error", () => {});
  const adminQuery = async <R extends Record<string, unknown>>(sql: string, params?: unknown[]) =>
    (await admin.query<R>(sql, params)).rows;

  let stopping: Promise<void> | undefined;
  return {
    host: HOST,
    port,
    dir: entry.dir,
    urlOf: (database) => `postgres://${USER}@${HOST}:${port}/${database}`,
    adminQuery,
    stop: () =>
      (stopping ??= (async () => {
        await Promise.race([admin.end().catch(() => {}), sleep(2_000)]);
        await shutdown(entry);
        rmSync(entry.dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
      })()),
  };
}

async function makeServer(entry: Live, port: number): Promise<PgServer> {
  const { urlOf, adminQuery, stop } = serverHandle(entry, port);

  let counter = 0;
  const createDatabase = async (name = "db") => {
    const base =
      name
        .toLowerCase()
        .replace(/[^a-z0-9_]+/g, "_")
        .slice(0, 40) || "db";
    const database = `${base}_${++counter}`;
    await adminQuery(`CREATE DATABASE "${database}" TEMPLATE template0`);
    return urlOf(database);
  };

  try {
    await adminQuery(`CREATE DATABASE "${TEST_DATABASE}" TEMPLATE template0`);
  } catch (error) {
    await stop();
    throw error;
  }

  return {
    url: urlOf(TEST_DATABASE),
    host: HOST,
    port,
    database: TEST_DATABASE,
    dir: entry.dir,
    createDatabase,
    adminQuery,
    stop,
  };
}

/**
 * A TypeORM DataSource (not initialized) on `url`, with `synchronize: true` and a pool of fixed size 5
 * unless `extra` says otherwise.
 */
export function pgDataSource(
  url: string,
  entities: DataSourceOptions["entities"],
  extra?: Record<string, unknown>,
): DataSource {
  return new DataSource({ type: "postgres", url, entities, synchronize: true, extra: { max: 5, ...extra } });
}
