/**
 * `npm run bench:contention`: a hot-spot ledger under concurrent transfers, to choose `retry` and its
 * backoff. 16 workers run a fixed, seeded list of random transfers (read both balances, write both)
 * through `withTransaction(…, { isolation, retry })` on a throwaway PostgreSQL server, for every isolation
 * level and way of writing the transfer, several `retry` counts and backoffs, and two sizes of the ledger.
 * Prints markdown on stdout, progress on stderr. Options: --quick (the first table only, fewer transfers),
 * --transfers N (per cell), --mariadb (adds a table on a throwaway MariaDB server).
 */
import { DataSource, type DataSourceOptions } from "typeorm";
import os from "node:os";
import { startMariaDbServer, type MariaDbServer } from "../spec/support/mariadb.js";
import { startPostgres, type PgServer } from "../spec/support/postgres.js";
import { createSessionRegistry, type RetryOptions, type SessionRegistry } from "../src/index.js";
import {
  makeTransfers,
  MODES,
  quantile,
  runCell,
  type CellResult,
  type Dialect,
  type Mode,
  type Transfer,
} from "./ledger.js";
import { table } from "./stats.js";

const argv = process.argv.slice(2);
const QUICK = argv.includes("--quick");
const transfersArg = argv.indexOf("--transfers");
const TRANSFERS = transfersArg >= 0 ? Math.max(1, Number(argv[transfersArg + 1]) || 1) : QUICK ? 400 : 2_000;
const WORKERS = 16;
const SEED = 13;
const RETRIES = [0, 1, 3, 5, 10];

const out = (text = "") => console.log(text);
const log = (line: string) => console.error(line);

interface Backoff {
  readonly label: string;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
}
const DEFAULT_BACKOFF: Backoff = { label: "10 ms → 1 s (default)", baseDelayMs: 10, maxDelayMs: 1_000 };
const BACKOFFS: readonly Backoff[] = [
  { label: "1 ms → 1 s", baseDelayMs: 1, maxDelayMs: 1_000 },
  DEFAULT_BACKOFF,
  { label: "50 ms → 1 s", baseDelayMs: 50, maxDelayMs: 1_000 },
];

interface Database {
  readonly dialect: Dialect;
  readonly label: string;
  readonly registry: SessionRegistry;
  readonly dataSource: DataSource;
}

async function openDatabase(dialect: Dialect, url: string, label: string): Promise<Database> {
  const type = dialect === "postgres" ? "postgres" : "mysql";
  // One pooled connection per worker, plus one for the timeouts' cancel statements.
  const extra = dialect === "postgres" ? { max: WORKERS + 1 } : { connectionLimit: WORKERS + 1 };
  const options = { type, url, entities: [], extra };
  const dataSource = await new DataSource(options as DataSourceOptions).initialize();
  const registry = createSessionRegistry({ name: `contention-${dialect}`, dataSource });
  return { dialect, label, registry, dataSource };
}

/** One measured cell. */
interface Row {
  readonly mode: Mode;
  readonly retries: number;
  readonly backoff: Backoff;
  readonly accounts: number;
  readonly result: CellResult;
}

const transferLists = new Map<number, Transfer[]>();
function transfersFor(accounts: number): Transfer[] {
  let list = transferLists.get(accounts);
  if (list === undefined) transferLists.set(accounts, (list = makeTransfers(TRANSFERS, accounts, SEED)));
  return list;
}

async function measure(db: Database, mode: Mode, retries: number, backoff: Backoff, accounts: number): Promise<Row> {
  const retry: number | RetryOptions =
    retries === 0 ? 0 : { retries, baseDelayMs: backoff.baseDelayMs, maxDelayMs: backoff.maxDelayMs };
  const result = await runCell(db.registry, {
    mode,
    retry,
    transfers: transfersFor(accounts),
    accounts,
    workers: WORKERS,
    dialect: db.dialect,
  });
  const row = { mode, retries, backoff, accounts, result };
  log(
    `  ${db.label}, ${accounts} accounts, ${mode.label}, retry ${retries}, ${backoff.label}: ${cells(row).join(" | ")}`,
  );
  return row;
}

const pct = (n: number, of: number) => `${((100 * n) / of).toFixed(n > 0 && n < of / 100 ? 2 : 1)} %`;

/** The measured columns of a row. */
function cells({ result: r }: Row): string[] {
  const codes = [...r.failures].map(([code, n]) => `${n}× ${code}`).join(", ");
  const money =
    r.drift === 0 && r.accountsOff === 0
      ? "exact"
      : `**${r.accountsOff} accounts off, total ${r.drift > 0 ? "+" : ""}${r.drift}**`;
  return [
    pct(r.failed, r.attempted) + (codes ? ` (${codes})` : ""),
    (r.retries / r.attempted).toFixed(3),
    String(r.deadlocks),
    quantile(r.latencies, 0.5).toFixed(1),
    quantile(r.latencies, 0.99).toFixed(1),
    Math.round(((r.attempted - r.failed) * 1000) / r.wallMs).toLocaleString("en-US"),
    money,
  ];
}

const MEASURED = [
  "failed after retries",
  "retries / transfer",
  "deadlocks",
  "p50 ms",
  "p99 ms",
  "commits/s",
  "balances",
];

function printRows(rows: readonly Row[], first: readonly string[], key: (row: Row) => readonly string[]): void {
  out(
    table(
      [...first, ...MEASURED],
      rows.map((row) => [...key(row), ...cells(row)]),
    ),
  );
  out();
}

const backoffLabel = (row: Row) => (row.retries === 0 ? "–" : row.backoff.label);

async function runPostgres(db: Database): Promise<void> {
  const hot = 20;
  log(`${db.label}: ${hot} accounts, every mode × retry ${RETRIES.join("/")}`);
  const main: Row[] = [];
  for (const mode of MODES) for (const r of RETRIES) main.push(await measure(db, mode, r, DEFAULT_BACKOFF, hot));
  out(`## ${db.label}: ${hot} accounts, retry count (default backoff)`);
  out();
  printRows(main, ["transfer", "retry"], (row) => [row.mode.label, String(row.retries)]);
  if (QUICK) return;

  log(`${db.label}: backoff`);
  const backoffRows: Row[] = [];
  for (const mode of MODES.filter((m) => m.id === "rr" || m.id === "ser")) {
    for (const r of [3, 5, 10]) {
      for (const b of BACKOFFS) {
        const known = main.find((row) => row.mode === mode && row.retries === r && row.backoff === b);
        backoffRows.push(known ?? (await measure(db, mode, r, b, hot)));
      }
    }
  }
  out(`## ${db.label}: ${hot} accounts, backoff (first delay → cap; doubled per retry, with jitter)`);
  out();
  printRows(backoffRows, ["transfer", "retry", "backoff"], (row) => [row.mode.label, String(row.retries), backoffLabel(row)]); // prettier-ignore

  const cold = 200;
  log(`${db.label}: ${cold} accounts`);
  const coldRows: Row[] = [];
  for (const mode of MODES) for (const r of [0, 3]) coldRows.push(await measure(db, mode, r, DEFAULT_BACKOFF, cold));
  out(`## ${db.label}: ${cold} accounts (less contention), default backoff`);
  out();
  printRows(coldRows, ["transfer", "retry"], (row) => [row.mode.label, String(row.retries)]);
}

async function runMariaDb(db: Database): Promise<void> {
  const hot = 20;
  log(`${db.label}: ${hot} accounts`);
  const rows: Row[] = [];
  for (const mode of MODES) for (const r of [0, 5]) rows.push(await measure(db, mode, r, DEFAULT_BACKOFF, hot));
  out(`## ${db.label}: ${hot} accounts, default backoff`);
  out();
  printRows(rows, ["transfer", "retry"], (row) => [row.mode.label, String(row.retries)]);
}

async function main(): Promise<void> {
  const started = performance.now();
  let pg: PgServer | undefined;
  let maria: MariaDbServer | undefined;
  const databases: Database[] = [];
  try {
    log("starting PostgreSQL");
    pg = await startPostgres();
    if (pg === undefined) throw new Error("PostgreSQL server binaries are needed (apt-get install postgresql-15)");
    const pgDb = await openDatabase("postgres", pg.url, "PostgreSQL");
    databases.push(pgDb);
    const version = (await pgDb.dataSource.query<{ v: string }[]>("SELECT current_setting('server_version') AS v"))[0];
    const cpus = os.cpus();
    out(`# Contention: a hot-spot ledger${QUICK ? " (--quick: indicative only)" : ""}`);
    out();
    out(`- ${new Date().toISOString().slice(0, 10)}; ${cpus.length} cores (${cpus[0]?.model.trim() ?? "?"}); node ${process.version}`); // prettier-ignore
    out(`- PostgreSQL ${version?.v ?? "?"}, throwaway local server (fsync off)`);
    out(`- ${TRANSFERS} transfers per cell (the same seeded list for every cell of a ledger size), ${WORKERS} workers, pool of ${WORKERS + 1}`); // prettier-ignore
    out();
    await runPostgres(pgDb);
    if (argv.includes("--mariadb")) {
      log("starting MariaDB");
      maria = await startMariaDbServer();
      if (maria === undefined) out("MariaDB skipped: no server binaries here.");
      else {
        const db = await openDatabase("mysql", await maria.createDatabase("contention"), `MariaDB ${maria.version}`);
        databases.push(db);
        await runMariaDb(db);
      }
    }
    log(`done in ${((performance.now() - started) / 1000).toFixed(0)} s`);
  } finally {
    for (const db of databases) {
      await db.registry.drain({ timeoutMs: 5_000 });
      await db.dataSource.destroy();
    }
    await maria?.stop();
    await pg?.stop();
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
