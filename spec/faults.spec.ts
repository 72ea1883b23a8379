// Fault injection and load, bounded in count and time, on SQLite, PostgreSQL and MariaDB. Each test
// prints one line of figures (blocks, faults by kind, leaks, violations, time).
import { expect } from "chai";
import { PropagationError, type Session, SessionTimeoutError, type SessionRegistry } from "../src/index.js";
import { type Backend, type BackendKind, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Account, Note } from "./support/entities.js";
import { mariaDbServer } from "./support/mariadb-hooks.js";
import { pgServer } from "./support/postgres-hooks.js";
import { deferred, load, rejectionOf, seeded } from "./support/util.js";

class Planned extends Error {}

const never = new Promise<never>(() => undefined);

/** Run `count` tasks, at most `width` at a time, in order of index. */
async function inBatches<T>(
  count: number,
  width: number,
  task: (i: number) => Promise<T>,
): Promise<PromiseSettledResult<T>[]> {
  const results: PromiseSettledResult<T>[] = [];
  for (let start = 0; start < count; start += width) {
    const batch = Array.from({ length: Math.min(width, count - start) }, (_, k) => task(start + k));
    results.push(...(await Promise.allSettled(batch)));
  }
  return results;
}

forEachBackend("faults and load", { mariadb: true }, (backend: Backend<BackendKind>) => {
  let db: TestDb<BackendKind>;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    await reg.withSession(() => undefined); // initialized
  });
  afterEach(() => db.dispose());

  const idleInTransaction = async (): Promise<number> => {
    if (backend.kind === "mariadb") {
      const rows = await mariaDbServer()!.adminQuery<{ n: number }>(
        "SELECT COUNT(*) AS n FROM information_schema.INNODB_TRX",
      );
      return Number(rows[0]!.n);
    }
    if (backend.kind !== "postgres") return 0;
    const rows = await pgServer()!.adminQuery<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
    );
    return rows[0]!.n;
  };

  const killBackend = async (s: Session): Promise<void> => {
    if (backend.kind === "mariadb") {
      const [row] = await s.query<{ id: number | string }[]>("SELECT CONNECTION_ID() AS id");
      await mariaDbServer()!.adminQuery(`KILL ${Number(row!.id)}`);
      return;
    }
    const [row] = await s.query<{ pid: number }[]>("SELECT pg_backend_pid() AS pid");
    const pid = row!.pid;
    await pgServer()!.adminQuery("SELECT pg_terminate_backend($1)", [pid]);
  };

  it("10 000 blocks with random faults: no leaked connection, no open transaction, exactly the resolved blocks' rows", async function () {
    this.timeout(300_000);
    const started = performance.now();
    const kinds = ["ok", "throws", "sqlError", "timeout", "abort", ...(backend.kind === "sqlite" ? [] : ["killed"])];
    const random = seeded(10_000);
    const plan = Array.from({ length: load(10_000) }, () => kinds[Math.floor(random() * kinds.length)]!);
    const timeoutMs = backend.kind === "sqlite" ? 5 : 25;
    // Failures that could not be thrown to anyone (a ROLLBACK on a killed backend): counted, not printed.
    let reported = 0;
    reg.on("error", () => (reported += 1));
    const results = await inBatches(plan.length, 100, (i) =>
      reg.withTransaction(
        async (s) => {
          const kind = plan[i]!;
          await s.getRepository(Note).insert({ body: kind, block: i });
          switch (kind) {
            case "throws":
              throw new Planned(`block ${i}`);
            case "sqlError":
              await s.query("SELECT * FROM no_such_table");
              break;
            case "timeout":
              await never;
              break;
            case "abort":
              await reg.remove(); // the client gives up on this unit of work
              break;
            case "killed":
              await killBackend(s);
              await s.query("SELECT 1");
              break;
          }
          return i;
        },
        plan[i] === "timeout" ? { timeoutMs } : {},
      ),
    );
    const resolved = results.flatMap((r, i) => (r.status === "fulfilled" ? [i] : []));
    const failedOk = results.flatMap((r, i) =>
      r.status === "rejected" && plan[i] === "ok" ? [`${i}: ${String(r.reason)}`] : [],
    );
    expect(failedOk, "blocks without a fault must commit").to.deep.equal([]);
    expect(resolved.every((i) => plan[i] === "ok")).to.equal(true);
    for (const [i, r] of results.entries()) {
      if (plan[i] === "timeout") expect(r.status === "rejected" && r.reason).to.be.instanceOf(SessionTimeoutError);
    }
    const rows = await reg.withSession((s) => s.getRepository(Note).find({ select: { block: true } }));
    const committed = rows.map((r) => r.block!).sort((a, b) => a - b);
    expect(committed, "committed rows are exactly those of the resolved blocks").to.deep.equal(resolved);
    // Blocks that timed out waiting for the pool give back the connection it hands them late.
    expect(await reg.drain({ timeoutMs: 10_000 })).to.include({ forced: 0 });
    expect(reg.stats().active).to.equal(0);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    expect(await idleInTransaction()).to.equal(0);
    const byKind = Object.fromEntries(kinds.map((k) => [k, plan.filter((p) => p === k).length]));
    console.log(
      `      [${backend.kind}] ${plan.length} blocks, faults ${JSON.stringify(byKind)}, ` +
        `leaked connections ${connectionsInUse(reg.dataSource!)}, cleanup errors reported ${reported}, violations 0, ${((performance.now() - started) / 1000).toFixed(1)} s`,
    );
  });

  it("pool exhaustion: as many outer blocks as connections, each nesting required blocks: no deadlock", async () => {
    const width = backend.kind === "sqlite" ? 1 : 5;
    const gate = deferred();
    const outers = Array.from({ length: width * 3 }, (_, i) =>
      reg.withTransaction(async (s) => {
        await s.query("SELECT 1");
        await gate.promise;
        await reg.withSession((inner) => inner.getRepository(Note).insert({ body: `outer ${i}`, block: i }));
        await reg.withTransaction((inner) => inner.getRepository(Note).insert({ body: `nested ${i}`, block: i }));
      }),
    );
    gate.resolve();
    await Promise.all(outers);
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(width * 3 * 2);
  });

  it("requiresNew under a full pool is bounded by timeoutMs and says so", async () => {
    const width = backend.kind === "sqlite" ? 1 : 5;
    const holding = Array.from({ length: width }, () => deferred());
    const release = deferred();
    const holders = holding.map((held) =>
      reg.withTransaction(async (s) => {
        await s.query("SELECT 1");
        held.resolve();
        await release.promise;
      }),
    );
    await Promise.all(holding.map((h) => h.promise));
    const error = await rejectionOf(
      reg.withSession(() =>
        reg.withTransaction((s) => s.query("SELECT 1"), { propagation: "requiresNew", timeoutMs: 100 }),
      ),
    );
    expect(error).to.be.instanceOf(SessionTimeoutError);
    expect((error as Error).message).to.match(/while waiting for a connection/);
    release.resolve();
    await Promise.all(holders);
    await reg.withSession((s) => s.query("SELECT 1"));
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("Promise.all in a transaction, one branch rejecting while others are in flight: late branches are refused", async () => {
    const late: unknown[] = [];
    const error = await rejectionOf(
      reg.withTransaction(async (s) =>
        Promise.all([
          (async () => {
            await s.getRepository(Note).insert({ body: "first", block: 1 });
            throw new Planned("one branch fails");
          })(),
          ...Array.from({ length: 5 }, async (_, k) => {
            for (let n = 0; n < 20; n++) {
              try {
                await s.getRepository(Note).insert({ body: `sibling ${k}.${n}`, block: 2 });
              } catch (e) {
                late.push(e);
                return;
              }
            }
          }),
        ]),
      ),
    );
    expect(error).to.be.instanceOf(Planned);
    // Let every sibling run into the closed session.
    await reg.withSession((s) => s.query("SELECT 1"));
    for (let i = 0; i < 50 && late.length < 5; i++) await new Promise<void>((r) => setImmediate(r));
    expect(late).to.have.length(5);
    for (const e of late) expect((e as Error).name).to.equal("SessionClosedError");
    expect(
      await reg.withSession((s) => s.getRepository(Note).count()),
      "nothing committed after the ROLLBACK",
    ).to.equal(0);
  });

  it("ledger: concurrent transfers at SERIALIZABLE with retry, some throwing: money conserved, each resolved transfer applied once", async function () {
    this.timeout(300_000);
    const started = performance.now();
    const transfers = load(5000);
    await reg.withTransaction(async (s) => {
      await s.getRepository(Account).insert(Array.from({ length: 20 }, () => ({ balance: 1000 })));
      await s.query("CREATE TABLE transfers (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL)");
    });
    const random = seeded(20);
    const plan = Array.from({ length: transfers }, (_, id) => ({
      id,
      from: 1 + Math.floor(random() * 20),
      to: 1 + Math.floor(random() * 20),
      amount: 1 + Math.floor(random() * 50),
      fails: random() < 0.2,
    }));
    let retries = 0;
    reg.on("begin", ({ attempt }) => {
      if (attempt !== undefined && attempt > 1) retries += 1;
    });
    const p = (n: number) => (backend.kind === "postgres" ? `$${n}` : "?");
    const results = await inBatches(transfers, 50, (i) => {
      const t = plan[i]!;
      return reg.withTransaction(
        async (s) => {
          const accounts = s.getRepository(Account);
          const from = await accounts.findOneByOrFail({ id: t.from });
          const to = await accounts.findOneByOrFail({ id: t.to });
          await accounts.update(from.id, { balance: from.balance - t.amount });
          if (from.id !== to.id) await accounts.update(to.id, { balance: to.balance + t.amount });
          else await accounts.update(from.id, { balance: from.balance });
          await s.query(`INSERT INTO transfers (id, amount) VALUES (${p(1)}, ${p(2)})`, [t.id, t.amount]);
          if (t.fails) throw new Planned(`transfer ${t.id}`);
        },
        { isolation: "SERIALIZABLE", retry: { retries: 50, baseDelayMs: 1, maxDelayMs: 20 } },
      );
    });
    const resolved = results.flatMap((r, i) => (r.status === "fulfilled" ? [i] : []));
    const unexpected = results.flatMap((r, i) =>
      r.status === "rejected" && !(r.reason instanceof Planned) ? [`${i}: ${String(r.reason)}`] : [],
    );
    expect(unexpected).to.deep.equal([]);
    expect(resolved).to.deep.equal(plan.flatMap((t, i) => (t.fails ? [] : [i])));
    const [balances, applied] = await reg.withSession(
      async (s) =>
        [
          await s.getRepository(Account).find(),
          await s.query<{ id: number }[]>("SELECT id FROM transfers ORDER BY id"),
        ] as const,
    );
    const total = balances.reduce((sum, a) => sum + a.balance, 0);
    expect(total, "money is conserved").to.equal(20 * 1000);
    expect(
      applied.map((r) => Number(r.id)),
      "each resolved transfer applied exactly once",
    ).to.deep.equal(resolved);
    // Each account's balance is exactly what the applied transfers say.
    const expected = new Map<number, number>(Array.from({ length: 20 }, (_, k) => [k + 1, 1000]));
    for (const i of resolved) {
      const t = plan[i]!;
      expected.set(t.from, expected.get(t.from)! - t.amount);
      expected.set(t.to, expected.get(t.to)! + t.amount);
    }
    for (const a of balances) expect(a.balance, `account ${a.id}`).to.equal(expected.get(a.id));
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    console.log(
      `      [${backend.kind}] ${transfers} transfers, ${resolved.length} applied, ${transfers - resolved.length} thrown, ` +
        `${retries} retried attempts, violations 0, ${((performance.now() - started) / 1000).toFixed(1)} s`,
    );
  });

  it("scope bleed: 10 000 interleaved blocks see only their own session at every await", async function () {
    this.timeout(120_000);
    let sightings = 0;
    let bleeds = 0;
    const random = seeded(7);
    await inBatches(load(10_000), 500, (i) =>
      reg.withSession(async (s) => {
        for (let step = 0; step < 4; step++) {
          if (random() < 0.5) await new Promise<void>((r) => setImmediate(r));
          else await Promise.resolve();
          sightings += 1;
          if (reg.current() !== s) bleeds += 1;
        }
        if (i % 10 === 0) await s.query("SELECT 1");
        sightings += 1;
        if (reg.current() !== s) bleeds += 1;
      }),
    );
    expect(bleeds).to.equal(0);
    expect(sightings).to.equal(load(10_000) * 5);
  });

  if (backend.kind === "postgres") {
    it("a connection whose backend was killed mid-transaction is destroyed, not returned to the pool", async () => {
      const errors: unknown[] = [];
      reg.on("error", (e) => errors.push(e.error));
      const error = await rejectionOf(
        reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ body: "lost", block: 1 });
          await killBackend(s);
          await s.query("SELECT 1");
        }),
      );
      // TypeORM 0.3 passes on the driver's error; TypeORM 1.x has released the dead runner by then.
      expect(String(error)).to.match(/terminat|Connection terminated|closed|released/i);
      // Every connection the pool hands out now works: the dead one is gone.
      await Promise.all(Array.from({ length: 5 }, () => reg.withSession((s) => s.query("SELECT 1"))));
      expect(connectionsInUse(reg.dataSource!)).to.equal(0);
      expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(0);
    });
  }

  if (backend.kind === "sqlite") {
    it("requiresNew inside a transaction still fails at once under load", async () => {
      const outcomes = await Promise.allSettled(
        Array.from({ length: 50 }, () =>
          reg.withTransaction(async (s) => {
            await s.query("SELECT 1");
            await reg.withSession(() => 1, { propagation: "requiresNew" });
          }),
        ),
      );
      expect(outcomes.every((o) => o.status === "rejected" && o.reason instanceof PropagationError)).to.equal(true);
    });
  }
});
