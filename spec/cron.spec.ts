import type { ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { expect } from "chai";
import cron, { type ScheduledTask, type TaskContext } from "node-cron";
import { DataSource, type Logger } from "typeorm";
import {
  createSessionRegistry,
  defaultRegistry,
  RegistryNotConfiguredError,
  type Session,
  type SessionRegistry,
} from "../src/index.js";
import { DatabaseRunCoordinator, sessionTask } from "../src/integrations/cron.js";
import { runCronJob } from "../examples/cron-job.js";
import { Note } from "./support/entities.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { freshDatabase, pgServer } from "./support/postgres-hooks.js";
import { within } from "./support/http.js";
import { TempSqlite } from "./support/sqlite.js";
import { recordEvents, rejectionOf } from "./support/util.js";
import { startWorker } from "./support/workers.js";

const forSqlite = { open: (): Promise<TestDb> => Promise.resolve(new TempSqlite()) };

class Boom extends Error {}

const context = (extra: Partial<TaskContext> = {}): TaskContext => ({
  date: new Date("2025-01-01T00:00:00.000Z"),
  dateLocalIso: "2025-01-01T00:00:00.000Z",
  triggeredAt: new Date(),
  ...extra,
});

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolve after `count` executions of `task` have ended (finished or failed); reject after `timeoutMs`. */
function executions(task: ScheduledTask, count: number, timeoutMs: number): Promise<TaskContext[]> {
  return new Promise((resolve, reject) => {
    const seen: TaskContext[] = [];
    const timer = setTimeout(
      () => reject(new Error(`expected ${count} executions within ${timeoutMs} ms, got ${seen.length}`)),
      timeoutMs,
    );
    const ended = (c: TaskContext) => {
      seen.push(c);
      if (seen.length === count) {
        clearTimeout(timer);
        resolve(seen);
      }
    };
    task.on("execution:finished", ended);
    task.on("execution:failed", ended);
  });
}

/** A unique lease table name, so that tests sharing a PostgreSQL database do not see each other's leases. */
let tables = 0;
const leaseTable = () => `leases_${process.pid}_${++tables}`;

forEachBackend("cron: sessionTask", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  const tasks: ScheduledTask[] = [];
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
  });
  afterEach(async () => {
    for (const task of tasks.splice(0)) await task.destroy();
    await db.dispose();
  });

  it("runs fn with a session and the context, and closes the session before settling", async () => {
    const { log } = recordEvents(reg, ["open", "close"]);
    let seen: Session | undefined;
    let seenContext: TaskContext | undefined;
    const ctx = context();
    const result = await sessionTask(
      async (s, c) => {
        seen = s;
        seenContext = c;
        expect(s.closed).to.be.false;
        return (await s.query<{ n: number }[]>("SELECT 1 AS n"))[0]!.n;
      },
      { registry: reg },
    )(ctx);
    expect(Number(result)).to.equal(1);
    expect(seenContext).to.equal(ctx);
    expect(seen!.closed).to.be.true;
    expect(log).to.deep.equal([`open#${seen!.id}`, `close#${seen!.id}`]);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("names the session after the option, else the task, else the function", async () => {
    const names: (string | undefined)[] = [];
    reg.on("open", (e) => names.push(e.name));
    const task = cron.createTask("0 0 1 1 *", () => undefined, { name: "nightly" });
    tasks.push(task);
    await sessionTask(async function purgeOld() {}, { registry: reg })(context());
    await sessionTask(async function purgeOld() {}, { registry: reg })(context({ task }));
    await sessionTask(async function purgeOld() {}, { registry: reg, name: "explicit" })(context({ task }));
    expect(names).to.deep.equal(["purgeOld", "nightly", "explicit"]);
  });

  it("commits with transaction: true, and rolls back and rejects when fn throws", async () => {
    const write = (body: string, fail: boolean) =>
      sessionTask(
        async (s) => {
          await s.getRepository(Note).save({ body });
          if (fail) throw new Boom(body);
        },
        { registry: reg, transaction: true },
      )(context());
    await write("kept", false);
    expect(await rejectionOf(write("undone", true))).to.be.instanceOf(Boom);
    const bodies = await reg.withSession((s) => s.getRepository(Note).find({ order: { id: "ASC" } }));
    expect(bodies.map((n) => n.body)).to.deep.equal(["kept"]);
    expect(reg.stats()).to.include({ commits: 1, rollbacks: 1, active: 0 });
  });

  it("runs on node-cron's schedule, each tick in a new session", async function () {
    this.timeout(10_000);
    const sessions: Session[] = [];
    const task = cron.schedule(
      "* * * * * *",
      sessionTask(
        async (s, c) => {
          sessions.push(s);
          await s.getRepository(Note).save({ body: c.date.toISOString() });
        },
        { registry: reg },
      ),
      { name: "ticker" },
    );
    tasks.push(task);
    const ended = await executions(task, 2, 3_500);
    await task.stop();
    expect(ended.map((c) => c.execution?.error)).to.deep.equal([undefined, undefined]);
    expect(sessions).to.have.length(2);
    expect(sessions[0]).to.not.equal(sessions[1]);
    expect(sessions.every((s) => s.closed && s.name === "ticker")).to.be.true;
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(2);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("does not join the finished scope of the code that scheduled the task", async function () {
    this.timeout(10_000);
    let outer: Session | undefined;
    let tick: Session | undefined;
    const task = await reg.withSession((s) => {
      outer = s;
      // node-cron's timers are created here, and carry this block's async context.
      return cron.schedule(
        "* * * * * *",
        sessionTask((t) => (tick = t), { registry: reg }),
        { name: "late" },
      );
    });
    tasks.push(task);
    const [ended] = await executions(task, 1, 2_500);
    await task.stop();
    expect(ended!.execution?.error).to.equal(undefined);
    expect(outer!.closed).to.be.true;
    expect(tick).to.be.an.instanceOf(Object).and.not.equal(outer);
  });

  it("joins the scope it is called in, like withSession", async () => {
    const fn = sessionTask((s) => s, { registry: reg });
    await reg.withSession(async (outer) => {
      expect(await fn(context())).to.equal(outer);
    });
  });

  it("rejects invalid arguments when the task function is made", () => {
    expect(() => sessionTask(42 as never)).to.throw(TypeError, /task body to be a function.*`42` \(number\)/);
    expect(() => sessionTask(() => 1, { timeoutMs: -1 })).to.throw(RangeError, /timeoutMs/);
    expect(() => sessionTask(() => 1, { bogus: true } as never)).to.throw(TypeError, /bogus/);
    expect(() => sessionTask(() => 1, { registry: {} as never })).to.throw(TypeError, /registry/);
  });
});

/** A registry on a new DataSource of `db` that records the SQL it sends. */
function loggedRegistry(db: TestDb, name: string, statements: string[]): SessionRegistry {
  const logger: Logger = {
    logQuery: (query) => void statements.push(query),
    logQueryError: () => undefined,
    logQuerySlow: () => undefined,
    logSchemaBuild: () => undefined,
    logMigration: () => undefined,
    log: () => undefined,
  };
  return createSessionRegistry({ name, dataSource: db.dataSource({ logging: true, logger }) });
}

forEachBackend("cron: DatabaseRunCoordinator", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  let table: string;
  const tasks: ScheduledTask[] = [];
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    table = leaseTable();
  });
  afterEach(async () => {
    for (const task of tasks.splice(0)) await task.destroy();
    await reg.withSession((s) => s.query(`DROP TABLE IF EXISTS "${table}"`)).catch(() => undefined);
    await db.dispose();
  });

  /** The lease rows, by key (sorted here: PostgreSQL's collation may order punctuation differently). */
  const rows = async () => {
    const found = await reg.withSession((s) =>
      s.query<{ key: string; completed_at: string | number | null }[]>(`SELECT "key", completed_at FROM "${table}"`),
    );
    return found.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  };

  it("creates its table if missing, once", async () => {
    const statements: string[] = [];
    const logged = loggedRegistry(db, "logged", statements);
    const coordinator = new DatabaseRunCoordinator({ registry: logged, table });
    expect(coordinator.table).to.equal(table);
    const granted = await Promise.all(["a", "b", "c"].map((k) => coordinator.shouldRun(k, 60_000)));
    expect(granted).to.deep.equal([true, true, true]);
    expect(await coordinator.shouldRun("d", 60_000)).to.be.true;
    await coordinator.onComplete("d");
    expect(statements.filter((sql) => sql.startsWith(`CREATE TABLE IF NOT EXISTS "${table}"`))).to.have.length(1);
    expect((await rows()).map((r) => r.key)).to.deep.equal(["a", "b", "c", "d"]);
    // A second coordinator on an existing table creates nothing and sees the same leases.
    expect(await new DatabaseRunCoordinator({ registry: reg, table }).shouldRun("a", 60_000)).to.be.false;
  });

  it("grants each key to exactly one of several registries asking at once", async function () {
    this.timeout(20_000);
    const coordinators = [reg, db.registry("b"), db.registry("c"), db.registry("d")].map(
      (registry) => new DatabaseRunCoordinator({ registry, table }),
    );
    await coordinators[0]!.shouldRun("warm-up", 60_000); // the table exists: this test is about the leases
    const keys = Array.from({ length: 6 }, (_, i) => `job:2025-01-01T00:00:0${i}.000Z`);
    const answers = await Promise.all(
      keys.map((key) => Promise.all(coordinators.map((c) => c.shouldRun(key, 60_000)))),
    );
    for (const perKey of answers) expect(perKey.filter(Boolean)).to.have.length(1);
    // Nobody gets it again, the winner included, and completing does not release it.
    for (const [i, key] of keys.entries()) {
      const winner = coordinators[answers[i]!.indexOf(true)]!;
      await winner.onComplete(key);
      expect(await Promise.all(coordinators.map((c) => c.shouldRun(key, 60_000)))).to.deep.equal([
        false,
        false,
        false,
        false,
      ]);
    }
    const completed = (await rows()).filter((r) => r.key !== "warm-up");
    expect(completed.map((r) => r.key)).to.deep.equal(keys);
    expect(completed.every((r) => r.completed_at !== null)).to.be.true;
  });

  it("grants a key again once its lease has expired, and not before", async function () {
    this.timeout(10_000);
    const first = new DatabaseRunCoordinator({ registry: reg, table });
    const second = new DatabaseRunCoordinator({ registry: db.registry("second"), table });
    expect(await first.shouldRun("k", 300)).to.be.true;
    await first.onComplete("k");
    expect(await second.shouldRun("k", 300)).to.be.false;
    expect(await first.shouldRun("k", 300)).to.be.false;
    await sleep(450);
    expect(await second.shouldRun("k", 300)).to.be.true;
    expect(await first.shouldRun("k", 300)).to.be.false;
    const [row] = await rows();
    expect(row!.completed_at).to.equal(null); // a new lease, not yet completed
  });

  it("purges expired leases during later acquisitions", async function () {
    this.timeout(10_000);
    const coordinator = new DatabaseRunCoordinator({ registry: reg, table });
    // Leases of 1.5 s: all four are still there after the four acquisitions, however slow the machine.
    for (const key of ["old-1", "old-2", "old-3"]) expect(await coordinator.shouldRun(key, 1_500)).to.be.true;
    expect(await coordinator.shouldRun("live", 60_000)).to.be.true;
    expect((await rows()).map((r) => r.key)).to.deep.equal(["live", "old-1", "old-2", "old-3"]);
    await sleep(1_700); // the old leases lapse
    expect(await coordinator.shouldRun("new", 60_000)).to.be.true;
    expect((await rows()).map((r) => r.key)).to.deep.equal(["live", "new"]);
  });

  it("keeps its statements out of the caller's transaction", async () => {
    const coordinator = new DatabaseRunCoordinator({ registry: reg, table });
    await coordinator.shouldRun("warm-up", 60_000);
    if (backend.kind === "sqlite") {
      // One connection, held by the caller's transaction: refused rather than waiting forever.
      const error = await rejectionOf(reg.withTransaction(() => coordinator.shouldRun("k", 60_000)));
      expect(error).to.have.property("name", "PropagationError");
      return;
    }
    await rejectionOf(
      reg.withTransaction(async () => {
        expect(await coordinator.shouldRun("k", 60_000)).to.be.true;
        throw new Boom("caller rolls back");
      }),
    );
    expect(await coordinator.shouldRun("k", 60_000)).to.be.false; // the lease survived the rollback
  });

  it("makes node-cron run each fire once among tasks sharing the database", async function () {
    this.timeout(15_000);
    const ran = new Map<string, number>();
    const registries = [reg, db.registry("b"), db.registry("c")];
    for (const registry of registries) {
      tasks.push(
        cron.schedule(
          "* * * * * *",
          sessionTask(
            async (s, c) => {
              const key = `shared:${c.date.toISOString()}`;
              ran.set(key, (ran.get(key) ?? 0) + 1);
              await s.query("SELECT 1");
            },
            { registry },
          ),
          {
            name: "shared",
            distributed: true,
            runCoordinator: new DatabaseRunCoordinator({ registry, table }),
          },
        ),
      );
    }
    await sleep(2_600);
    for (const task of tasks) await task.stop();
    await sleep(300); // a fire in flight at the stop finishes
    const leases = (await rows()).map((r) => r.key);
    expect(ran.size).to.be.at.least(2);
    expect([...ran.values()].every((n) => n === 1)).to.be.true;
    expect([...ran.keys()].sort()).to.deep.equal(leases);
  });

  it("rejects invalid options and arguments", async () => {
    const make = (options: unknown) => () => new DatabaseRunCoordinator(options as never);
    expect(make(null)).to.throw(TypeError, /options to be an object, got `null`/);
    expect(make({ registry: 42 })).to.throw(TypeError, /`registry` to be a SessionRegistry, got `42` \(number\)/);
    expect(make({ table: 7 })).to.throw(TypeError, /`table` to be a string, got `7` \(number\)/);
    expect(make({ table: 'leases"; DROP TABLE notes; --' })).to.throw(
      RangeError,
      /`table` to be a plain SQL identifier/,
    );
    expect(make({ table: "" })).to.throw(RangeError, /`table`/);
    expect(make({ ttl: 5 })).to.throw(TypeError, /Unknown DatabaseRunCoordinator option `ttl`/);
    expect(new DatabaseRunCoordinator().table).to.equal("scoped_session_cron_leases");
    const coordinator = new DatabaseRunCoordinator({ registry: reg, table });
    expect(await rejectionOf(coordinator.shouldRun("", 1000))).to.be.instanceOf(TypeError);
    expect(await rejectionOf(coordinator.shouldRun("k", 0))).to.be.instanceOf(RangeError);
    expect(await rejectionOf(coordinator.shouldRun("k", Number.NaN))).to.be.instanceOf(RangeError);
    expect(await rejectionOf(coordinator.onComplete(undefined as never))).to.be.instanceOf(TypeError);
  });
});

/** What a worker prints when it exits. */
interface Output {
  pid: number;
  ran: string[];
  skipped: number;
}

describe("cron: DatabaseRunCoordinator across processes [postgres]", function () {
  const children: ChildProcess[] = [];
  let url: string;
  before(async function () {
    if (pgServer() === undefined) this.skip();
    url = await freshDatabase("cron_processes");
  });
  afterEach(() => {
    for (const child of children.splice(0)) if (child.exitCode === null) child.kill("SIGKILL");
  });

  it("runs every fire of a task scheduled by 3 processes exactly once", async function () {
    this.timeout(30_000);
    const table = leaseTable();
    const setup = new DataSource({ type: "postgres", url });
    await setup.initialize();
    try {
      await setup.query("CREATE TABLE cron_runs (id serial PRIMARY KEY, key text NOT NULL, pid integer NOT NULL)");
      const worker = fileURLToPath(new URL("./support/cron-worker.js", import.meta.url));
      const started = [1, 2, 3].map(() => startWorker<Output>(worker, [url, table, "distributed"], children));
      const bounded = <T>(promise: Promise<T>, ms: number, what: string) =>
        Promise.race([promise, sleep(ms).then(() => Promise.reject(new Error(`workers: ${what} within ${ms} ms`)))]);
      // Every failure below leaves the children to afterEach, which kills them.
      await bounded(Promise.all(started.map((w) => w.ready)), 15_000, "not all ready");
      const deadline = Date.now() + 3_500;
      for (const { child } of started) child.stdin.end(`${deadline}\n`);
      const outputs = await bounded(Promise.all(started.map((w) => w.done)), 12_000, "not all finished");
      const runs = await setup.query<{ key: string; pid: number }[]>("SELECT key, pid FROM cron_runs");
      const leases = await setup.query<{ key: string }[]>(`SELECT key FROM "${table}"`);
      const perKey = new Map<string, number>();
      for (const { key } of runs) perKey.set(key, (perKey.get(key) ?? 0) + 1);
      const duplicates = [...perKey.values()].filter((n) => n > 1).length;
      const perProcess = outputs.map((o) => o.ran.length);
      console.log(
        `      fires: ${perKey.size}, runs per process: ${perProcess.join("/")}, ` +
          `skipped per process: ${outputs.map((o) => o.skipped).join("/")}, duplicates: ${duplicates}`,
      );
      expect(duplicates).to.equal(0);
      expect(perKey.size).to.be.at.least(2);
      expect(runs).to.have.length(perProcess.reduce((a, b) => a + b, 0));
      // Every granted lease was run, and every run had a lease.
      expect([...perKey.keys()].sort()).to.deep.equal(leases.map((l) => l.key).sort());
    } finally {
      await setup.destroy();
    }
  });
});

describe("examples/cron-job", function () {
  it("runs two ticks of a coordinated task on embedded SQLite, then stops", async function () {
    this.timeout(15_000);
    const result = await runCronJob();
    expect(result.ticks).to.have.length(2);
    expect(result.leases).to.deep.equal(result.ticks.map((t) => `heartbeat:${t}`));
    expect(result.heartbeats).to.equal(2);
  });
});

describe("cron: a task and its coordinator on the application's registry", () => {
  let db: TestDb;
  let reg: SessionRegistry;
  const tasks: ScheduledTask[] = [];
  before(function () {
    // These tests are about the default registry having no data source.
    if (defaultRegistry.dataSource !== undefined) this.skip();
  });
  beforeEach(async () => {
    db = await forSqlite.open();
    reg = db.registry("app");
  });
  afterEach(async () => {
    for (const task of tasks.splice(0)) await task.destroy();
    await db.dispose();
  });

  it("sessionTask without `registry` while the default registry has no data source: the error names the fix", async () => {
    let ran = false;
    const error = await rejectionOf(sessionTask(() => void (ran = true))(context()));
    expect(error).to.be.instanceOf(RegistryNotConfiguredError);
    expect(error).to.include({ code: "ERR_REGISTRY_NOT_CONFIGURED" });
    expect((error as Error).message).to.include("sessionTask(fn, { registry: db })");
    expect((error as Error).message).to.include("configureSessions");
    expect(ran).to.be.false;
  });

  it("DatabaseRunCoordinator without `registry` while the default registry has no data source: the error names the fix", async () => {
    const error = await rejectionOf(new DatabaseRunCoordinator().shouldRun("k:2025-01-01T00:00:00.000Z", 1_000));
    expect(error).to.be.instanceOf(RegistryNotConfiguredError);
    expect((error as Error).message).to.include("new DatabaseRunCoordinator({ registry: db })");
  });

  it("the mistake of the old README example (task on the default registry, coordinator on db) fails each tick loudly", async function () {
    this.timeout(10_000);
    const logged: unknown[] = [];
    const failed = new Promise<TaskContext>((resolve) => {
      const task = cron.schedule(
        "* * * * * *",
        sessionTask(async (s) => s.query<unknown>("SELECT 1")),
        {
          name: "mistaken",
          distributed: true,
          runCoordinator: new DatabaseRunCoordinator({ registry: reg }),
          logger: { info() {}, warn() {}, debug() {}, error: (...args: unknown[]) => void logged.push(...args) },
        },
      );
      task.on("execution:failed", resolve);
      tasks.push(task);
    });
    const context = await within(failed, "the first tick to fail", 5_000);
    const error = context.execution?.error;
    expect(error).to.be.instanceOf(RegistryNotConfiguredError);
    expect(error?.message).to.include("sessionTask(fn, { registry: db })");
    expect(logged).to.include(error);
  });

  it("the corrected README example (both on db) runs its ticks in transactions on db", async function () {
    this.timeout(10_000);
    const committed = new Promise<string | undefined>((resolve) => reg.on("commit", (e) => resolve(e.name)));
    tasks.push(
      cron.schedule(
        "* * * * * *",
        sessionTask(async (s, { date }) => s.getRepository(Note).insert({ body: date.toISOString() }), {
          registry: reg,
          transaction: true,
        }),
        { name: "corrected", distributed: true, runCoordinator: new DatabaseRunCoordinator({ registry: reg }) },
      ),
    );
    expect(await within(committed, "the first tick to commit", 5_000)).to.equal("corrected");
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.be.at.least(1);
  });
});
