// DatabaseRunCoordinator: takeover of a fire whose holder died (at least once), and a graceful
// stop while a fire runs (drain() waits for it, its completion is recorded, nothing is logged).
import { type ChildProcess, spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { expect } from "chai";
import { DataSource } from "typeorm";
import type { TaskContext } from "node-cron";
import { RegistryClosedError, type SessionRegistry } from "../src/index.js";
import { DatabaseRunCoordinator, sessionTask } from "../src/integrations/cron.js";
import { type Backend, forEachBackend, type TestDb } from "./support/backends.js";
import { freshDatabase, pgServer } from "./support/postgres-hooks.js";
import { within } from "./support/http.js";
import { rejectionOf } from "./support/util.js";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Whether `promise` has settled after `ms` (an observation window, for what must not happen). */
async function settledWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let settled = false;
  promise.then(
    () => (settled = true),
    () => (settled = true),
  );
  await sleep(ms);
  return settled;
}

let tables = 0;
const leaseTable = () => `takeover_${process.pid}_${++tables}`;

/** One fire of the task "job", as node-cron gives it to the task function, and its key. */
function fire(second: number): { context: TaskContext; key: string } {
  const date = new Date(Date.UTC(2030, 0, 1, 0, 0, second));
  return { context: { task: { name: "job" }, date } as unknown as TaskContext, key: `job:${date.toISOString()}` };
}

describe("cron: DatabaseRunCoordinator options", () => {
  it("checks takeover and leaseMs", () => {
    const make = (options: unknown) => () => new DatabaseRunCoordinator(options as never);
    expect(make({ takeover: "yes" })).to.throw(TypeError, /`takeover` to be a boolean, got `"yes"` \(string\)/);
    expect(make({ leaseMs: 5_000 })).to.throw(TypeError, /`leaseMs` applies only with `takeover: true`/);
    expect(make({ takeover: false, leaseMs: 5_000 })).to.throw(TypeError, /add `takeover: true` or remove `leaseMs`/);
    expect(make({ takeover: true, leaseMs: "5s" })).to.throw(TypeError, /`leaseMs` to be a number of milliseconds/);
    expect(make({ takeover: true, leaseMs: 50 })).to.throw(
      RangeError,
      /`leaseMs` to be a finite number .* from 100 up, got `50`/,
    );
    expect(make({ takeover: true, leaseMs: Number.POSITIVE_INFINITY })).to.throw(RangeError, /`leaseMs`/);
    expect(make({ lease: 5 })).to.throw(TypeError, /expected one of registry, table, takeover, leaseMs/);
    const plain = new DatabaseRunCoordinator();
    expect([plain.takeover, plain.leaseMs]).to.deep.equal([false, undefined]);
    const taking = new DatabaseRunCoordinator({ takeover: true });
    expect([taking.takeover, taking.leaseMs]).to.deep.equal([true, 15_000]);
    expect(new DatabaseRunCoordinator({ takeover: true, leaseMs: 1_000.5 }).leaseMs).to.equal(1_001);
  });
});

forEachBackend("cron: DatabaseRunCoordinator takeover and drain", (backend: Backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  let table: string;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
    table = leaseTable();
  });
  afterEach(async () => {
    const cleaner = db.registry("cleaner");
    await cleaner.withSession((s) => s.query(`DROP TABLE IF EXISTS "${table}"`)).catch(() => undefined);
    await db.dispose();
  });

  /** The lease rows, read through a registry of their own (the test's may be drained). */
  const rows = async () => {
    const found = await db
      .registry("reader")
      .withSession((s) =>
        s.query<{ key: string; completed_at: unknown }[]>(`SELECT "key", completed_at FROM "${table}" ORDER BY "key"`),
      );
    return found.map((r) => ({ key: r.key, completed: r.completed_at !== null }));
  };

  for (const takeover of [false, true]) {
    const mode = takeover ? "with takeover" : "without takeover";
    it(`${mode}: declines fires while the registry drains, and drain() waits for a running fire's completion`, async function () {
      this.timeout(15_000);
      const options = takeover ? { takeover, leaseMs: 150 } : {};
      const coordinator = new DatabaseRunCoordinator({ registry: reg, table, ...options });
      const { context, key } = fire(1);
      expect(await coordinator.shouldRun(key, 60_000)).to.be.true;
      let finish!: () => void;
      const work = new Promise<void>((resolve) => (finish = resolve));
      const tick = sessionTask(() => work, { registry: reg })(context);
      const draining = reg.drain({ timeoutMs: 10_000 });
      // Running and not completed: drain() waits (and with takeover the heartbeat goes on meanwhile).
      expect(await settledWithin(draining, 400)).to.be.false;
      expect(await coordinator.shouldRun(fire(2).key, 60_000)).to.be.false;
      const another = new DatabaseRunCoordinator({ registry: reg, table, ...options });
      expect(await another.shouldRun(fire(3).key, 60_000)).to.be.false;
      finish();
      await tick;
      // The tick's session has closed; its completion is still to be recorded.
      expect(await settledWithin(draining, 200)).to.be.false;
      await coordinator.onComplete(key);
      expect(await within(draining, "drain() to finish")).to.deep.equal({ waited: 1, forced: 0 });
      expect(await rows()).to.deep.equal([{ key, completed: true }]);
    });

    it(`${mode}: a granted fire whose tick has not begun does not hold drain(); refused by the drain, it is not recorded as completed`, async function () {
      this.timeout(15_000);
      // node-cron runs a granted fire after its maxRandomDelay jitter, which task.stop() cancels.
      const options = takeover ? { takeover, leaseMs: 150 } : {};
      const coordinator = new DatabaseRunCoordinator({ registry: reg, table, ...options });
      const { context, key } = fire(1);
      expect(await coordinator.shouldRun(key, 60_000)).to.be.true;
      expect(await within(reg.drain({ timeoutMs: 10_000 }), "drain() to finish", 2_000)).to.deep.equal({
        waited: 0,
        forced: 0,
      });
      // The jitter ends after the drain began: the tick is refused, its body never runs.
      let ran = false;
      const refused = await rejectionOf(sessionTask(() => void (ran = true), { registry: reg })(context));
      expect(refused).to.be.instanceOf(RegistryClosedError);
      expect(ran).to.be.false;
      await coordinator.onComplete(key);
      expect(await rows()).to.deep.equal([{ key, completed: false }]);
      if (takeover) {
        // Handed back: a live instance takes it over at once.
        const live = new DatabaseRunCoordinator({ registry: db.registry("live"), table, ...options });
        expect(await within(live.shouldRun(key, 60_000), "the takeover", 2_000)).to.be.true;
        await live.onComplete(key);
        expect(await rows()).to.deep.equal([{ key, completed: true }]);
      }
    });
  }

  it("with takeover: a granted fire whose tick never begins is handed back once the registry drains", async function () {
    this.timeout(15_000);
    const options = { table, takeover: true, leaseMs: 150 } as const;
    const { key } = fire(1);
    expect(await new DatabaseRunCoordinator({ registry: reg, ...options }).shouldRun(key, 60_000)).to.be.true;
    const live = new DatabaseRunCoordinator({ registry: db.registry("live"), ...options });
    const answer = live.shouldRun(key, 60_000);
    // task.stop() cancelled the tick: no onComplete ever comes. While the registry is open, the heartbeat holds the fire.
    expect(await settledWithin(answer, 600)).to.be.false;
    await within(reg.drain({ timeoutMs: 10_000 }), "drain() to finish", 2_000);
    expect(await within(answer, "the takeover", 3_000)).to.be.true;
    await live.onComplete(key);
  });

  it("with takeover: a waiter gets false once the holder completes; the heartbeat keeps the lease meanwhile", async function () {
    this.timeout(15_000);
    const holder = new DatabaseRunCoordinator({ registry: reg, table, takeover: true, leaseMs: 200 });
    const other = new DatabaseRunCoordinator({ registry: db.registry("b"), table, takeover: true, leaseMs: 200 });
    expect(await holder.shouldRun("job:1", 60_000)).to.be.true;
    const waiting = other.shouldRun("job:1", 60_000);
    expect(await settledWithin(waiting, 1_000)).to.be.false; // five leases long: renewed, not taken over
    await holder.onComplete("job:1");
    expect(await within(waiting, "the waiter to answer", 3_000)).to.be.false;
    expect(await rows()).to.deep.equal([{ key: "job:1", completed: true }]);
    // Completed: granted to nobody, late askers included.
    expect(await holder.shouldRun("job:1", 60_000)).to.be.false;
  });

  it("with takeover: another instance takes over the fire of a holder that died, once", async function () {
    this.timeout(15_000);
    const dying = db.registry("dying");
    const options = { table, takeover: true, leaseMs: 200 } as const;
    const holder = new DatabaseRunCoordinator({ registry: dying, ...options });
    const waiters = ["b", "c"].map((name) => new DatabaseRunCoordinator({ registry: db.registry(name), ...options }));
    expect(await holder.shouldRun("job:1", 60_000)).to.be.true;
    const answers = waiters.map((w) => w.shouldRun("job:1", 60_000));
    // The holder's process dies: no heartbeat, no completion.
    await dying.drain({ timeoutMs: 0, destroy: true });
    // One of them takes over (true) once the lease lapses; the other keeps waiting.
    const never = new Promise<never>(() => undefined);
    const index = await within(
      Promise.race(answers.map((answer, i) => answer.then((granted) => (granted ? i : never)))),
      "a takeover",
      5_000,
    );
    const taker = waiters[index]!;
    expect(await rows()).to.deep.equal([{ key: "job:1", completed: false }]);
    await taker.onComplete("job:1");
    // The other waiter sees the completion and declines.
    expect(await within(Promise.all(answers), "both waiters", 3_000)).to.have.members([true, false]);
    expect(await rows()).to.deep.equal([{ key: "job:1", completed: true }]);
  });

  it("with takeover: a lapsed lease survives the purge for a late asker to take over", async function () {
    this.timeout(15_000);
    const dying = db.registry("dying");
    const options = { table, takeover: true, leaseMs: 150 } as const;
    expect(await new DatabaseRunCoordinator({ registry: dying, ...options }).shouldRun("job:1", 60_000)).to.be.true;
    await dying.drain({ timeoutMs: 0, destroy: true });
    await sleep(300); // the lease lapses
    const late = new DatabaseRunCoordinator({ registry: reg, ...options });
    expect(await late.shouldRun("job:2", 100)).to.be.true; // purges
    expect(await rows()).to.deep.equal([
      { key: "job:1", completed: false },
      { key: "job:2", completed: false },
    ]);
    expect(await late.shouldRun("job:1", 60_000)).to.be.true; // taken over
    await late.onComplete("job:1");
    await late.onComplete("job:2");
  });

  it("with takeover: a waiter gets false when its own registry drains", async function () {
    this.timeout(15_000);
    const waiting = db.registry("b");
    const holder = new DatabaseRunCoordinator({ registry: reg, table, takeover: true, leaseMs: 200 });
    const other = new DatabaseRunCoordinator({ registry: waiting, table, takeover: true, leaseMs: 200 });
    expect(await holder.shouldRun("job:1", 60_000)).to.be.true;
    const answer = other.shouldRun("job:1", 60_000);
    expect(await settledWithin(answer, 100)).to.be.false;
    const drained = await within(waiting.drain({ timeoutMs: 5_000 }), "the waiter's registry to drain", 5_000);
    expect(drained.forced).to.equal(0);
    expect(await within(answer, "the waiter to answer", 2_000)).to.be.false;
    await holder.onComplete("job:1");
  });
});

/** One worker process of spec/support/cron-tick-worker.ts, with what it printed. */
interface Worker {
  readonly child: ChildProcess;
  readonly pid: number;
  stdout: string;
  stderr: string;
  /** Resolves with the first line matching `pattern`, already printed or (`later`) printed from now on. */
  line(pattern: RegExp, later?: boolean): Promise<string>;
  readonly exited: Promise<number | null>;
}

describe("cron: takeover and graceful stop across processes [postgres]", function () {
  const children: ChildProcess[] = [];
  let url: string;
  let setup: DataSource;
  before(async function () {
    if (pgServer() === undefined) this.skip();
    url = await freshDatabase("cron_takeover");
    setup = new DataSource({ type: "postgres", url });
    await setup.initialize();
    await setup.query(
      "CREATE TABLE cron_ticks (id serial PRIMARY KEY, key text NOT NULL, pid integer NOT NULL, phase text NOT NULL)",
    );
  });
  afterEach(() => {
    for (const child of children.splice(0))
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
  after(async () => {
    if (setup?.isInitialized) await setup.destroy();
  });

  const script = fileURLToPath(new URL("./support/cron-tick-worker.js", import.meta.url));

  function start(table: string, name: string, lease: string, workMs: number): Worker {
    const child = spawn(process.execPath, [script, url, table, name, lease, String(workMs)], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    children.push(child);
    const waiting: { pattern: RegExp; resolve: (line: string) => void }[] = [];
    const worker: Worker = {
      child,
      pid: child.pid!,
      stdout: "",
      stderr: "",
      line(pattern, later = false) {
        const found = later ? undefined : worker.stdout.split("\n").find((l) => pattern.test(l));
        if (found !== undefined) return Promise.resolve(found);
        return new Promise((resolve) => waiting.push({ pattern, resolve }));
      },
      exited: new Promise((resolve) => child.on("exit", (code) => resolve(code))),
    };
    child.stderr.on("data", (chunk: Buffer) => (worker.stderr += chunk.toString()));
    let partial = "";
    child.stdout.on("data", (chunk: Buffer) => {
      const lines = (partial + chunk.toString()).split("\n");
      partial = lines.pop()!; // the rest of a line still to come
      for (const line of lines) {
        worker.stdout += `${line}\n`;
        for (const w of waiting.splice(0)) {
          if (w.pattern.test(line)) w.resolve(line);
          else waiting.push(w);
        }
      }
    });
    return worker;
  }

  /** Every tick row of task `name`, by key: who started and who finished it. */
  async function ticks(name: string): Promise<Map<string, { started: number[]; finished: number[] }>> {
    const found = await setup.query<{ key: string; pid: number; phase: string }[]>(
      "SELECT key, pid, phase FROM cron_ticks WHERE key LIKE $1 ORDER BY id",
      [`${name}:%`],
    );
    const byKey = new Map<string, { started: number[]; finished: number[] }>();
    for (const { key, pid, phase } of found) {
      const entry = byKey.get(key) ?? { started: [], finished: [] };
      (phase === "started" ? entry.started : entry.finished).push(pid);
      byKey.set(key, entry);
    }
    return byKey;
  }

  for (const takeover of [true, false]) {
    const mode = takeover ? "on" : "off";
    it(`takeover ${mode}: 3 instances, the one mid-tick is killed with SIGKILL`, async function () {
      this.timeout(60_000);
      const table = leaseTable();
      const name = `kill_${mode}`;
      const workers = [1, 2, 3].map(() => start(table, name, takeover ? "1000" : "off", 1_500));
      await within(Promise.all(workers.map((w) => w.line(/^ready$/))), "3 workers ready", 15_000);
      // A fire runs in full first; then the instance that starts the next fire dies mid-tick.
      await within(Promise.race(workers.map((w) => w.line(/^finished /))), "a first finished tick", 10_000);
      const victim = await within(
        Promise.race(workers.map((w) => w.line(/^started /, true).then(() => w))),
        "a fire to start",
        5_000,
      );
      victim.child.kill("SIGKILL");
      await within(victim.exited, "the killed worker to exit", 5_000);
      const survivors = workers.filter((w) => w !== victim);
      const orphans = [...(await ticks(name)).entries()]
        .filter(([, t]) => t.started.includes(victim.pid) && !t.finished.includes(victim.pid))
        .map(([key]) => key);
      expect(orphans.length).to.be.at.least(1);
      if (takeover) {
        // Each fire the dead instance held is finished by a survivor once its lease lapses.
        await within(
          Promise.all(
            orphans.map((key) => Promise.race(survivors.map((w) => w.line(new RegExp(`^finished ${escape(key)}$`))))),
          ),
          "the killed fires to be taken over",
          15_000,
        );
      } else {
        await sleep(3_000); // long enough for a takeover, which must not come
      }
      for (const w of survivors) w.child.kill("SIGTERM");
      const codes = await within(Promise.all(survivors.map((w) => w.exited)), "the survivors to stop", 20_000);
      expect(codes, survivors.map((w) => w.stderr).join("\n")).to.deep.equal([0, 0]);

      const all = await ticks(name);
      const runs = [...all.values()].reduce((n, t) => n + t.started.length, 0);
      const duplicates = [...all.entries()].filter(([, t]) => t.started.length > 1).map(([key]) => key);
      const takenOver = orphans.filter((key) => all.get(key)!.finished.some((pid) => pid !== victim.pid));
      const unfinished = [...all.entries()].filter(([, t]) => t.finished.length === 0).map(([key]) => key);
      console.log(
        `      takeover ${mode}: fires ${all.size}, runs ${runs}, killed mid-run ${orphans.length}, ` +
          `taken over ${takenOver.length}, started twice ${duplicates.length}, never finished ${unfinished.length}`,
      );
      for (const w of survivors) expect(w.stderr, `worker ${w.pid} logged`).to.equal("");
      if (takeover) {
        expect(unfinished).to.deep.equal([]); // no fire lost
        expect(takenOver).to.deep.equal(orphans);
        expect(duplicates.sort()).to.deep.equal([...orphans].sort()); // only the killed fires ran again
        for (const [, t] of all) expect(t.finished).to.have.length(1);
      } else {
        expect(duplicates).to.deep.equal([]); // none run twice
        expect(unfinished.sort()).to.deep.equal([...orphans].sort()); // the killed fires are lost
      }
    });
  }

  for (const lease of ["off", "1000"]) {
    it(`graceful stop mid-tick (takeover ${lease === "off" ? "off" : "on"}): drain() waits, completion recorded, nothing logged`, async function () {
      this.timeout(30_000);
      const table = leaseTable();
      const name = `stop_${lease}`;
      const worker = start(table, name, lease, 1_500);
      await within(worker.line(/^ready$/), "the worker to be ready", 15_000);
      const started = await within(worker.line(/^started /), "a tick to start", 10_000);
      const key = started.slice("started ".length);
      worker.child.kill("SIGTERM");
      const code = await within(worker.exited, "the worker to stop", 20_000);
      expect(worker.stderr).to.equal(""); // node-cron logged nothing (no "onComplete failed")
      expect(code).to.equal(0);
      const lines = worker.stdout.trim().split("\n");
      expect(lines).to.include(`finished ${key}`);
      const drained = JSON.parse(lines.at(-1)!) as { drained: { waited: number; forced: number } };
      expect(drained.drained.forced).to.equal(0);
      expect(drained.drained.waited).to.be.at.least(1);
      const [lease_] = await setup.query<{ completed_at: string | null }[]>(
        `SELECT completed_at FROM "${table}" WHERE key = $1`,
        [key],
      );
      expect(lease_?.completed_at).to.not.equal(null);
      expect(lease_?.completed_at).to.not.equal(undefined);
    });
  }
});

/** `text` as a literal in a regular expression. */
function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
