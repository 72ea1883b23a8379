/**
 * A throwaway PostgreSQL primary with one streaming hot standby, for the specs of read-replica support.
 *
 * `startReplicatedPostgres()` starts a primary with `startPostgres({ replication: true })`, copies it with
 * `pg_basebackup -R -X stream` into a second temporary directory and starts that copy as a hot standby on
 * another free port of 127.0.0.1. Both servers have the clean-up guarantees of ./postgres.ts (stopped and
 * removed by `stop()`, at exit, and by a watchdog when the test process dies).
 *
 * The standby replicates the whole cluster: create a database on the primary, `waitForReplay()`, then open
 * the same database on the standby with `standbyUrl(primaryUrl)`.
 */
import { existsSync, realpathSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import {
  HOST,
  USER,
  execFileBounded,
  launchServer,
  makeTempDir,
  postgresPrerequisites,
  serverHandle,
  serverSettings,
  startPostgres,
  type PgServer,
} from "./postgres.js";

/**
 * The standby of a {@link ReplicatedPg}: read-only (hot standby), same databases as the primary.
 *
 * @example
 * const [{ r }] = await pair.standby.adminQuery<{ r: boolean }>("SELECT pg_is_in_recovery() AS r"); // true
 */
export interface PgStandby {
  /** `postgres://postgres@127.0.0.1:PORT/DATABASE`: the primary's test database, as replicated here. */
  readonly url: string;
  readonly host: string;
  readonly port: number;
  /** The temporary directory: data in `data/`, the unix socket, `postgres.log`. */
  readonly dir: string;
  /** Run one statement as the superuser on the standby's `postgres` database; resolves the rows. */
  adminQuery<R extends Record<string, unknown> = Record<string, unknown>>(
    sql: string,
    params?: unknown[],
  ): Promise<R[]>;
  /** Stop the standby (immediate shutdown, bounded) and remove its directory. Idempotent. */
  stop(): Promise<void>;
}

/**
 * A primary and its streaming standby (see {@link startReplicatedPostgres}).
 *
 * @example
 * const url = await pair.primary.createDatabase("reads");
 * await pair.waitForReplay();
 * const readUrl = pair.standbyUrl(url); // same database, the standby's port
 */
export interface ReplicatedPg {
  readonly primary: PgServer;
  readonly standby: PgStandby;
  /**
   * Resolves once the standby has replayed everything the primary had written when this was called;
   * rejects after ~15 s.
   */
  waitForReplay(): Promise<void>;
  /** The URL of the same database (and user) as `primaryUrl`, on the standby. */
  standbyUrl(primaryUrl: string): string;
  /** Stop both servers and remove both directories. Idempotent. */
  stop(): Promise<void>;
}

const BASEBACKUP_TIMEOUT_MS = 60_000;
const REPLAY_TIMEOUT_MS = 15_000;
// Replay has no event a client can wait on (LISTEN does not work on a standby): poll, briefly.
const REPLAY_POLL_MS = 20;

/**
 * `pg_basebackup` of the same installation as `initdb`: in its directory, or in the one `initdb` links to
 * (Debian links only initdb, pg_ctl and postgres into /usr/local/bin or similar).
 */
function findBasebackup(binDir: string): string | undefined {
  const dirs = [binDir];
  try {
    dirs.push(dirname(realpathSync(join(binDir, "initdb"))));
  } catch {
    // a dangling link: findPostgresBinDir only checked that it exists
  }
  return dirs.map((dir) => join(dir, "pg_basebackup")).find((file) => existsSync(file));
}

/**
 * Start a primary and a streaming hot standby of it. Resolves `undefined` (after printing one line why) when
 * PostgreSQL or `pg_basebackup` is not available here; rejects when they are but the pair fails to start.
 *
 * @example
 * let pair: ReplicatedPg;
 * before(async function () {
 *   const started = await startReplicatedPostgres();
 *   if (!started) this.skip();
 *   pair = started;
 * });
 * after(() => pair?.stop());
 *
 * it("reads on the standby what was written on the primary", async () => {
 *   const url = await pair.primary.createDatabase("reads");
 *   // ... write through `url` ...
 *   await pair.waitForReplay();
 *   // ... read through pair.standbyUrl(url) ...
 * });
 */
export async function startReplicatedPostgres(): Promise<ReplicatedPg | undefined> {
  const pre = postgresPrerequisites();
  if (!pre) return undefined;
  const { binDir, runAs } = pre;
  const basebackup = findBasebackup(binDir);
  if (!basebackup) {
    console.log(`[postgres] replication specs skipped: no pg_basebackup next to ${join(binDir, "initdb")}`);
    return undefined;
  }

  const primary = await startPostgres({ replication: true });
  if (!primary) return undefined;

  const dir = makeTempDir(runAs);
  let standby: PgStandby;
  try {
    await execFileBounded(
      basebackup,
      // -c fast: checkpoint at once rather than spread over minutes; --no-sync: throwaway data.
      ["-h", HOST, "-p", String(primary.port), "-U", USER, "-D", join(dir, "data"), "-R", "-X", "stream"].concat([
        "-c",
        "fast",
        "--no-sync",
      ]),
      runAs,
      BASEBACKUP_TIMEOUT_MS,
    );
    const { entry, port } = await launchServer(binDir, runAs, dir, serverSettings(true));
    const handle = serverHandle(entry, port);
    standby = {
      url: handle.urlOf(primary.database),
      host: handle.host,
      port: handle.port,
      dir: handle.dir,
      adminQuery: handle.adminQuery,
      stop: handle.stop,
    };
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    await primary.stop();
    throw error;
  }

  const waitForReplay = async () => {
    // The target is read, then a transaction that writes WAL (a transactional logical message, ignored by
    // physical replication) commits with synchronous_commit on, in one statement. Its commit record ends past
    // the target, so the standby's replay position reaches the target; and the commit flushes everything
    // up to there at once, so the WAL sender ships it now rather than when the WAL writer next wakes (the
    // servers run with synchronous_commit=off; a transaction that wrote no WAL of its own, such as one
    // that only took an xid, would commit asynchronously whatever synchronous_commit says).
    const [row] = await primary.adminQuery<{ lsn: string }>(
      "SELECT pg_current_wal_insert_lsn()::text AS lsn, set_config('synchronous_commit', 'on', true), " +
        "pg_logical_emit_message(true, 'tss-replay', '')",
    );
    const target = row!.lsn;
    const deadline = Date.now() + REPLAY_TIMEOUT_MS;
    let replayed: string | null = null;
    for (;;) {
      const [state] = await standby.adminQuery<{ done: boolean; replayed: string | null }>(
        "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false) AS done, pg_last_wal_replay_lsn()::text AS replayed",
        [target],
      );
      if (state!.done) return;
      replayed = state!.replayed;
      if (Date.now() >= deadline) break;
      await new Promise<void>((resolve) => setTimeout(resolve, REPLAY_POLL_MS));
    }
    throw new Error(
      `the standby did not replay up to ${target} within ${REPLAY_TIMEOUT_MS} ms (replayed up to ${replayed ?? "nothing"})`,
    );
  };

  const standbyUrl = (primaryUrl: string) => {
    const url = new URL(primaryUrl);
    url.hostname = standby.host;
    url.port = String(standby.port);
    return url.toString();
  };

  let stopping: Promise<void> | undefined;
  return {
    primary,
    standby,
    waitForReplay,
    standbyUrl,
    stop: () => (stopping ??= Promise.all([standby.stop(), primary.stop()]).then(() => {})),
  };
}
