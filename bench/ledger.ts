/**
 * The hot-spot ledger of `bench/contention.ts`: a table of accounts, a fixed list of random transfers, and
 * one measured run ("cell") of that list by concurrent workers through `withTransaction`, with the check
 * that no money was created or lost.
 */
import { type IsolationLevel, type RetryOptions, type Session, type SessionRegistry } from "../src/index.js";
import { seeded } from "../spec/support/util.js";

export type Dialect = "postgres" | "mysql";

/** How a transfer reads and writes the two balances, and at which isolation level. */
export interface Mode {
  readonly id: string;
  readonly label: string;
  readonly isolation: IsolationLevel;
  /** `rmw`: read both, write both; `forUpdate`: the same after `SELECT … FOR UPDATE` in id order; `atomic`: `balance = balance ± x`. */
  readonly body: "rmw" | "forUpdate" | "atomic";
  /** Where this read-modify-write without a lock loses updates: report the drift there, do not require 0. */
  readonly losesUpdatesOn: readonly Dialect[];
}

export const MODES: readonly Mode[] = [
  {
    id: "rc",
    label: "READ COMMITTED, read then write",
    isolation: "READ COMMITTED",
    body: "rmw",
    losesUpdatesOn: ["postgres", "mysql"],
  },
  { id: "rc-atomic", label: "READ COMMITTED, atomic `UPDATE`", isolation: "READ COMMITTED", body: "atomic", losesUpdatesOn: [] }, // prettier-ignore
  { id: "rc-lock", label: "READ COMMITTED, `FOR UPDATE`", isolation: "READ COMMITTED", body: "forUpdate", losesUpdatesOn: [] }, // prettier-ignore
  { id: "rr", label: "REPEATABLE READ", isolation: "REPEATABLE READ", body: "rmw", losesUpdatesOn: ["mysql"] },
  { id: "ser", label: "SERIALIZABLE", isolation: "SERIALIZABLE", body: "rmw", losesUpdatesOn: [] },
];

export const INITIAL_BALANCE = 1_000;

export interface Transfer {
  readonly from: number;
  readonly to: number;
  readonly amount: number;
}

/** `count` transfers between two distinct accounts of 1..`accounts`, amounts 1..10. */
export function makeTransfers(count: number, accounts: number, seed: number): Transfer[] {
  const random = seeded(seed);
  const pick = () => 1 + Math.floor(random() * accounts);
  return Array.from({ length: count }, () => {
    const from = pick();
    let to = pick();
    while (to === from) to = pick();
    return { from, to, amount: 1 + Math.floor(random() * 10) };
  });
}

/** (Re)create the `ledger_account` table with `accounts` rows of {@link INITIAL_BALANCE}. */
export async function resetAccounts(registry: SessionRegistry, accounts: number): Promise<void> {
  await registry.withSession(async (s) => {
    await s.query("DROP TABLE IF EXISTS ledger_account");
    await s.query("CREATE TABLE ledger_account (id integer PRIMARY KEY, balance integer NOT NULL)");
    const rows = Array.from({ length: accounts }, (_, i) => `(${i + 1}, ${INITIAL_BALANCE})`).join(", ");
    await s.query(`INSERT INTO ledger_account (id, balance) VALUES ${rows}`);
  });
}

/** One transfer, as the mode says; placeholders in the dialect's syntax. */
async function transfer(s: Session, mode: Mode, t: Transfer, dialect: Dialect): Promise<void> {
  const p = (n: number) => (dialect === "postgres" ? `$${n}` : "?");
  const read = async (id: number) =>
    Number((await s.query<{ balance: number }[]>(`SELECT balance FROM ledger_account WHERE id = ${p(1)}`, [id]))[0]!.balance); // prettier-ignore
  const write = (id: number, balance: number) =>
    s.query(`UPDATE ledger_account SET balance = ${p(1)} WHERE id = ${p(2)}`, [balance, id]);
  if (mode.body === "atomic") {
    await s.query(`UPDATE ledger_account SET balance = balance - ${p(1)} WHERE id = ${p(2)}`, [t.amount, t.from]);
    await s.query(`UPDATE ledger_account SET balance = balance + ${p(1)} WHERE id = ${p(2)}`, [t.amount, t.to]);
    return;
  }
  if (mode.body === "forUpdate") {
    // Both rows locked in one statement, in id order: transfers that share an account queue, never deadlock.
    const rows = await s.query<{ id: number; balance: number }[]>(
      `SELECT id, balance FROM ledger_account WHERE id IN (${p(1)}, ${p(2)}) ORDER BY id FOR UPDATE`,
      [t.from, t.to],
    );
    const balance = (id: number) => Number(rows.find((r) => Number(r.id) === id)!.balance);
    await write(t.from, balance(t.from) - t.amount);
    await write(t.to, balance(t.to) + t.amount);
    return;
  }
  const from = await read(t.from);
  const to = await read(t.to);
  await write(t.from, from - t.amount);
  await write(t.to, to + t.amount);
}

export interface CellConfig {
  readonly mode: Mode;
  readonly retry: number | RetryOptions;
  readonly transfers: readonly Transfer[];
  readonly accounts: number;
  readonly workers: number;
  readonly dialect: Dialect;
}

export interface CellResult {
  readonly attempted: number;
  readonly failed: number;
  /** Failed transfers by error code (`40001`, `40P01`, `ER_LOCK_DEADLOCK`, …). */
  readonly failures: ReadonlyMap<string, number>;
  /** Extra attempts, summed over all transfers (those that failed in the end included). */
  readonly retries: number;
  /** Per transfer, retries included, in ms, ascending. */
  readonly latencies: readonly number[];
  readonly wallMs: number;
  /** Sum of all balances minus the sum at the start: 0 unless money was created or lost. */
  readonly drift: number;
  /** Accounts whose balance is not what the committed transfers make it (lost updates). */
  readonly accountsOff: number;
  /** Attempts that ended in a deadlock (retried or not). */
  readonly deadlocks: number;
}

/** The error code of a failed block: the driver's `code`, looked up through `driverError` and `cause`. */
export function errorCode(error: unknown): string {
  for (let e: unknown = error, depth = 0; typeof e === "object" && e !== null && depth < 3; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" || typeof code === "number") return String(code);
    e = (e as { driverError?: unknown }).driverError ?? (e as { cause?: unknown }).cause;
  }
  return error instanceof Error ? error.name : "unknown";
}

/** PostgreSQL's and MySQL's deadlock errors. */
const DEADLOCK_CODES = new Set(["40P01", "ER_LOCK_DEADLOCK"]);

/** A block must not hang the benchmark: each attempt is bounded. */
const ATTEMPT_TIMEOUT_MS = 15_000;

/** Run the cell's transfers with `workers` concurrent workers, then check the balances. */
export async function runCell(registry: SessionRegistry, cell: CellConfig): Promise<CellResult> {
  await resetAccounts(registry, cell.accounts);
  const expected = new Array<number>(cell.accounts + 1).fill(INITIAL_BALANCE);
  const failures = new Map<string, number>();
  const latencies: number[] = [];
  let next = 0;
  let attempts = 0;
  let deadlocks = 0;
  const options = { isolation: cell.mode.isolation, retry: cell.retry, timeoutMs: ATTEMPT_TIMEOUT_MS };
  const worker = async () => {
    for (let i = next++; i < cell.transfers.length; i = next++) {
      const t = cell.transfers[i]!;
      const started = performance.now();
      try {
        await registry.withTransaction(async (s) => {
          attempts++;
          try {
            await transfer(s, cell.mode, t, cell.dialect);
          } catch (error) {
            // A deadlock is reported to the statement that waited: count it in every attempt, retried or not.
            if (DEADLOCK_CODES.has(errorCode(error))) deadlocks++;
            throw error;
          }
        }, options);
        expected[t.from]! -= t.amount;
        expected[t.to]! += t.amount;
      } catch (error) {
        const code = errorCode(error);
        failures.set(code, (failures.get(code) ?? 0) + 1);
      }
      latencies.push(performance.now() - started);
    }
  };
  const started = performance.now();
  await Promise.all(Array.from({ length: cell.workers }, worker));
  const wallMs = performance.now() - started;

  const rows = await registry.withSession((s) =>
    s.query<{ id: number; balance: number }[]>("SELECT id, balance FROM ledger_account ORDER BY id"),
  );
  const drift = rows.reduce((sum, r) => sum + Number(r.balance), 0) - cell.accounts * INITIAL_BALANCE;
  const accountsOff = rows.filter((r) => Number(r.balance) !== expected[Number(r.id)]).length;
  if (!cell.mode.losesUpdatesOn.includes(cell.dialect) && (drift !== 0 || accountsOff !== 0)) {
    throw new Error(
      `${cell.mode.label}: the balances are wrong (drift ${drift}, ${accountsOff} accounts off); ` +
        "this mode must not lose updates, so the transfer body or the library is broken",
    );
  }
  const failed = [...failures.values()].reduce((a, b) => a + b, 0);
  return {
    attempted: cell.transfers.length,
    failed,
    failures,
    retries: attempts - cell.transfers.length,
    latencies: latencies.sort((a, b) => a - b),
    wallMs,
    drift,
    accountsOff,
    deadlocks,
  };
}

/** The `q`-quantile (0..1) of ascending `sorted` values (nearest rank). */
export function quantile(sorted: readonly number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}
