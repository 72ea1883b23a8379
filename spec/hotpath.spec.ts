import { expect } from "chai";
import sinon from "sinon";
import {
  DataSource,
  EntityManager,
  type EntitySubscriberInterface,
  EventSubscriber,
  type InsertEvent,
  type LoadEvent,
  type QueryRunner,
  type Repository,
} from "typeorm";
import { createSessionRegistry, type Session, SessionClosedError, SessionTimeoutError } from "../src/index.js";
import { type Backend, connectionsInUse, forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { TempSqlite } from "./support/sqlite.js";
import { deferred, recordEvents, rejectionOf, seeded, turns } from "./support/util.js";

/*
 * Adversarial tests of the hot-path commits: the shared (pipelined) SQLite lease for
 * statements outside transactions, the runner view built from one descriptor map, the
 * EntityManager subclass made once per DataSource, and the synchronous close of idle sessions.
 */

class Planned extends Error {}

/** An INSERT into notes with the placeholders of the backend. */
function insertSql(kind: "sqlite" | "postgres"): string {
  return kind === "postgres"
    ? "INSERT INTO notes (body, block) VALUES ($1, $2)"
    : "INSERT INTO notes (body, block) VALUES (?, ?)";
}

/** The event of a query subscriber method (generic in TypeORM 0.3, not in 1.x). */
type QueryEvent<M extends "beforeQuery" | "afterQuery"> = Parameters<NonNullable<EntitySubscriberInterface[M]>>[0];

/** Driver query events whose SQL carries a marker, with the manager TypeORM handed to the subscriber. */
const queryEvents: { phase: string; sql: string; manager: EntityManager | undefined }[] = [];

@EventSubscriber()
class QueryWatcher implements EntitySubscriberInterface {
  beforeQuery(event: QueryEvent<"beforeQuery">): void {
    if (event.query.includes("hp-marker"))
      queryEvents.push({ phase: "before", sql: event.query, manager: event.manager });
  }

  afterQuery(event: QueryEvent<"afterQuery">): void {
    if (event.query.includes("hp-marker"))
      queryEvents.push({ phase: "after", sql: event.query, manager: event.manager });
  }
}

/** Entity events on notes, with what TypeORM handed to the subscriber. */
const entityEvents: {
  event: string;
  body: string;
  manager: EntityManager;
  runner: QueryRunner | undefined;
  data: unknown;
}[] = [];

@EventSubscriber()
class NoteWatcher implements EntitySubscriberInterface<Note> {
  listenTo(): typeof Note {
    return Note;
  }

  beforeInsert(event: InsertEvent<Note>): void {
    entityEvents.push({
      event: "beforeInsert",
      body: event.entity.body,
      manager: event.manager,
      runner: event.queryRunner,
      data: (event.queryRunner.data as { tag?: string }).tag,
    });
  }

  afterLoad(entity: Note, event?: LoadEvent<Note>): void {
    entityEvents.push({
      event: "afterLoad",
      body: entity.body,
      manager: event!.manager,
      runner: event!.queryRunner,
      data: undefined,
    });
  }
}

// ---------------------------------------------------------------------------
forEachBackend("hot path: the session's EntityManager (a subclass made once per DataSource)", (backend: Backend) => {
  let db: TestDb;
  beforeEach(async () => {
    db = await backend.open();
  });
  afterEach(() => db.dispose());

  it("is an EntityManager bound to its own session: queryRunner, repositories, connection; a concurrent session has its own", async () => {
    const reg = db.registry();
    const checks = await reg.withSession(async (a) => {
      await a.query("SELECT 1");
      return reg.withSession(
        async (b) => {
          await b.query("SELECT 1");
          const ds = reg.dataSource!;
          return {
            instanceOfEntityManager: a.manager instanceof EntityManager && b.manager instanceof EntityManager,
            instanceOfDataSourceManagerClass: a.manager instanceof (ds.manager.constructor as typeof EntityManager),
            oneClassPerDataSource: Object.getPrototypeOf(a.manager) === Object.getPrototypeOf(b.manager),
            connection: a.manager.connection === ds && b.manager.connection === ds,
            managerRunner: a.manager.queryRunner === a.queryRunner && b.manager.queryRunner === b.queryRunner,
            runnerManager: a.queryRunner.manager === a.manager && b.queryRunner.manager === b.manager,
            runnerConnection: a.queryRunner.connection === ds && b.queryRunner.connection === ds,
            distinctManagers: a.manager !== b.manager,
            distinctRunners: a.queryRunner !== b.queryRunner,
            repositoryManager:
              a.getRepository(Note).manager === a.manager && b.getRepository(Note).manager === b.manager,
            repositoryRunner: a.getRepository(Note).queryRunner === a.queryRunner,
            distinctRepositories: a.getRepository(Note) !== b.getRepository(Note),
            sameRepositoryTwice: a.getRepository(Note) === a.manager.getRepository(Note),
          };
        },
        { propagation: "requiresNew" },
      );
    });
    expect(checks).to.deep.equal({
      instanceOfEntityManager: true,
      instanceOfDataSourceManagerClass: true,
      oneClassPerDataSource: true,
      connection: true,
      managerRunner: true,
      runnerManager: true,
      runnerConnection: true,
      distinctManagers: true,
      distinctRunners: true,
      repositoryManager: true,
      repositoryRunner: true,
      distinctRepositories: true,
      sameRepositoryTwice: true,
    });
    expect(reg.stats()).to.include({ active: 0 });
  });

  it("withRepository(): a custom repository runs on the session, sees its uncommitted rows and rolls back with it", async () => {
    const reg = db.registry();
    await reg.withSession((s) => s.query("SELECT 1")); // initialize
    const Notes = reg.dataSource!.getRepository(Note).extend({
      byBlock(this: Repository<Note>, block: number) {
        return this.findBy({ block });
      },
    });
    const seen = await rejectionOf(
      reg.withTransaction(async (s) => {
        const notes = s.manager.withRepository(Notes);
        await notes.save({ body: "custom", block: 5 });
        const rows = await notes.byBlock(5);
        throw new Planned(
          JSON.stringify({
            rows: rows.map((n) => n.body),
            manager: notes.manager === s.manager,
            // (TypeORM's withRepository() does not copy the repository's own queryRunner field.)
            runner: notes.manager.queryRunner === s.queryRunner,
          }),
        );
      }),
    );
    expect(seen).to.be.instanceOf(Planned);
    expect(JSON.parse((seen as Error).message)).to.deep.equal({ rows: ["custom"], manager: true, runner: true });
    expect(await reg.withSession((s) => s.getRepository(Note).count()), "rolled back with the block").to.equal(0);
  });

  it("manager.transaction(): the callback gets the session's manager; nested is a savepoint; concurrent calls are each atomic; a non-function rejects", async () => {
    const reg = db.registry();
    const { log } = recordEvents(reg, ["begin", "commit", "rollback"]);
    const result = await reg.withSession(async (s) => {
      const m = s.manager;
      const same = await m.transaction(async (tm) => {
        await tm.insert(Note, { body: "outer", block: 1 });
        const inner = await rejectionOf(
          tm.transaction(async (t2) => {
            await t2.insert(Note, { body: "inner", block: 2 });
            throw new Planned("inner");
          }),
        );
        expect(inner).to.be.instanceOf(Planned);
        return tm === s.manager;
      });
      const outcomes = await Promise.allSettled(
        [3, 4, 5, 6].map((block) =>
          m.transaction(async (t) => {
            await t.insert(Note, { body: "first", block });
            await turns(1 + (block % 2));
            await t.insert(Note, { body: "second", block });
            if (block % 2 === 0) throw new Planned(`tx ${block}`);
          }),
        ),
      );
      const notAFunction = await rejectionOf(m.transaction(undefined as never));
      return { same, outcomes: outcomes.map((o) => o.status), notAFunction: notAFunction instanceof TypeError };
    });
    expect(result).to.deep.equal({
      same: true,
      outcomes: ["fulfilled", "rejected", "fulfilled", "rejected"],
      notAFunction: true,
    });
    const rows = await reg.withSession((s) => s.getRepository(Note).find());
    expect(rows.map((n) => `${n.body}:${n.block}`).sort()).to.deep.equal([
      "first:3",
      "first:5",
      "outer:1",
      "second:3",
      "second:5",
    ]);
    const begins = log.filter((l) => l.startsWith("begin"));
    expect(
      begins.filter((l) => l.endsWith(":sp")),
      "one savepoint",
    ).to.have.length(1);
    expect(
      begins.filter((l) => !l.endsWith(":sp")),
      "five transactions",
    ).to.have.length(5);
    expect(reg.stats()).to.include({ active: 0, commits: 3, rollbacks: 2 });
  });

  it("entity subscribers see the manager, runner and save({ data }) of their own session while two sessions interleave", async () => {
    entityEvents.length = 0;
    const reg = createSessionRegistry({ name: "entities", dataSource: db.dataSource({ subscribers: [NoteWatcher] }) });
    const sessions = new Map<string, Session>();
    await Promise.all(
      ["alpha", "beta"].map((tag) =>
        reg.withSession(async (s) => {
          sessions.set(tag, s);
          await s.getRepository(Note).save({ body: tag, block: 1 }, { data: { tag } });
          await turns(1);
          await s.getRepository(Note).findBy({ body: tag });
          await s.manager.transaction((m) => m.getRepository(Note).save({ body: tag, block: 2 }, { data: { tag } }));
        }),
      ),
    );
    const wrong = entityEvents.flatMap((e) => {
      const s = sessions.get(e.body)!;
      const problems: string[] = [];
      if (e.manager !== s.manager) problems.push(`${e.event} of ${e.body}: another session's manager`);
      if (e.runner !== s.queryRunner) problems.push(`${e.event} of ${e.body}: another session's queryRunner`);
      if (e.event === "beforeInsert" && e.data !== e.body) {
        problems.push(`${e.event} of ${e.body}: queryRunner.data of ${String(e.data)}`);
      }
      return problems;
    });
    expect(wrong).to.deep.equal([]);
    expect(entityEvents.map((e) => e.event).sort()).to.deep.equal([
      "afterLoad",
      "afterLoad",
      "beforeInsert",
      "beforeInsert",
      "beforeInsert",
      "beforeInsert",
    ]);
  });

  it("driver query events (beforeQuery/afterQuery) of concurrent statements carry the manager of the session whose statement it is", async () => {
    queryEvents.length = 0;
    const reg = createSessionRegistry({ name: "queries", dataSource: db.dataSource({ subscribers: [QueryWatcher] }) });
    await reg.withSession((s) => s.query("SELECT 1")); // initialize
    const managers = new Map<string, EntityManager>();
    await Promise.all(
      ["a", "b", "c"].map((tag) =>
        reg.withSession(async (s) => {
          managers.set(tag, s.manager);
          await s.query(`SELECT 'hp-marker-${tag}' AS tag`);
        }),
      ),
    );
    const whose = (m: EntityManager | undefined): string =>
      [...managers].find(([, mm]) => mm === m)?.[0] ?? "no session's";
    const seen = queryEvents.map(
      (e) => `${e.phase} ${/hp-marker-(\w)/.exec(e.sql)![1]}: manager of ${whose(e.manager)}`,
    );
    expect(seen.sort()).to.deep.equal([
      "after a: manager of a",
      "after b: manager of b",
      "after c: manager of c",
      "before a: manager of a",
      "before b: manager of b",
      "before c: manager of c",
    ]);
  });

  it("two DataSources get a manager class each; each session's manager works on its own DataSource", async () => {
    const dsA = db.dataSource();
    const dsB = db.dataSource();
    const a = createSessionRegistry({ name: "a", dataSource: dsA });
    const b = createSessionRegistry({ name: "b", dataSource: dsB });
    const checks = await a.withSession(async (sa) => {
      await sa.query("SELECT 1");
      const sa2Proto = await a.withSession((sa2) => Object.getPrototypeOf(sa2.manager) as object, {
        propagation: "requiresNew",
      });
      return b.withSession(async (sb) => {
        await sb.query("SELECT 1");
        return {
          ownConnection: sa.manager.connection === dsA && sb.manager.connection === dsB,
          classPerDataSource: Object.getPrototypeOf(sa.manager) !== Object.getPrototypeOf(sb.manager),
          sameClassWithinOne: Object.getPrototypeOf(sa.manager) === sa2Proto,
          bothEntityManagers: sa.manager instanceof EntityManager && sb.manager instanceof EntityManager,
          registries: sa.registry === a && sb.registry === b,
        };
      });
    });
    expect(checks).to.deep.equal({
      ownConnection: true,
      classPerDataSource: true,
      sameClassWithinOne: true,
      bothEntityManagers: true,
      registries: true,
    });
    // One after the other (two SQLite connections on one file must not write at once).
    await a.withSession((s) => s.manager.transaction((m) => m.insert(Note, { body: "via a", block: 1 })));
    expect(await b.withSession((s) => s.manager.count(Note))).to.equal(1);
    await rejectionOf(
      b.withSession((s) =>
        s.manager.transaction(async (m) => {
          await m.insert(Note, { body: "via b, undone", block: 2 });
          throw new Planned("undo");
        }),
      ),
    );
    expect(await a.withSession((s) => s.manager.find(Note)).then((r) => r.map((n) => n.body))).to.deep.equal(["via a"]);
  });

  it("a DataSource whose createEntityManager() is customized: each session's manager comes from it", async () => {
    class TenantManager extends EntityManager {
      tenant: string | undefined;
    }
    class TenantDataSource extends DataSource {
      override createEntityManager(queryRunner?: QueryRunner): EntityManager {
        const manager = new TenantManager(this, queryRunner);
        manager.tenant = "acme";
        return manager;
      }
    }
    const ds = new TenantDataSource(db.dataSource().options);
    const reg = createSessionRegistry({ name: "tenant", dataSource: ds });
    try {
      const seen = await reg.withSession(async (s) => {
        await s.query("SELECT 1");
        return {
          subclass: s.manager instanceof TenantManager,
          tenant: (s.manager as TenantManager).tenant,
          rows: await s.manager.count(Note),
        };
      });
      expect(seen).to.deep.equal({ subclass: true, tenant: "acme", rows: 0 });
    } finally {
      if (ds.isInitialized) await ds.destroy();
    }
  });

  it("a DataSource destroyed and initialized again still works: transactions, readers, the runner view", async () => {
    const ds = db.dataSource();
    const reg = createSessionRegistry({ name: "reinit", dataSource: ds });
    await reg.withTransaction((s) => s.getRepository(Note).insert({ body: "before", block: 1 }));
    await ds.destroy();
    await ds.initialize();
    const view = await reg.withTransaction(async (s) => {
      await s.getRepository(Note).insert({ body: "after", block: 2 });
      return {
        connection: s.manager.connection === ds && s.queryRunner.connection === ds,
        hasTable: await s.queryRunner.hasTable("notes"),
        active: s.queryRunner.isTransactionActive,
      };
    });
    expect(view).to.deep.equal({ connection: true, hasTable: true, active: true });
    const [writer, reader] = await Promise.allSettled([
      reg.withTransaction(async (s) => {
        await s.getRepository(Note).insert({ body: "undone", block: 3 });
        await turns(2);
        throw new Planned("undo");
      }),
      reg.withSession(async (s) => {
        await turns(1);
        return s.getRepository(Note).count();
      }),
    ]);
    expect(writer.status === "rejected" && writer.reason).to.be.instanceOf(Planned);
    expect(reader).to.deep.equal({ status: "fulfilled", value: 2 });
    const bodies = await reg.withSession(async (s) =>
      (await s.getRepository(Note).find({ order: { id: "ASC" } })).map((n) => n.body),
    );
    expect(bodies).to.deep.equal(["before", "after"]);
    expect(reg.stats()).to.include({ active: 0 });
    expect(connectionsInUse(ds)).to.equal(0);
  });
});

// ---------------------------------------------------------------------------
forEachBackend("hot path: the session's runner view", (backend: Backend) => {
  let db: TestDb;
  beforeEach(async () => {
    db = await backend.open();
  });
  afterEach(() => db.dispose());

  it("isTransactionActive: false outside, true inside, false from a sibling frame and from another session's view", async () => {
    const reg = db.registry();
    const seen = await reg.withSession(async (s) => {
      const view = s.queryRunner;
      const before = view.isTransactionActive;
      const inside = deferred();
      const leave = deferred();
      const tx = s.manager.transaction(async () => {
        const own = view.isTransactionActive;
        const nested = await reg.withTransaction(() => view.isTransactionActive);
        inside.resolve();
        await leave.promise;
        return { own, nested };
      });
      await inside.promise;
      const sibling = view.isTransactionActive;
      leave.resolve();
      const { own, nested } = await tx;
      const after = view.isTransactionActive;
      // Another session's transaction: this view must not report it (on SQLite the driver's
      // runner is shared and its own flag is set).
      const other = await reg.withTransaction(
        async (t) => {
          await t.query("SELECT 1");
          return { theirs: t.queryRunner.isTransactionActive, mine: view.isTransactionActive };
        },
        { propagation: "requiresNew" },
      );
      return { before, own, nested, sibling, after, ...other };
    });
    expect(seen).to.deep.equal({
      before: false,
      own: true,
      nested: true,
      sibling: false,
      after: false,
      theirs: true,
      mine: false,
    });
  });

  it("release() does nothing: the transaction and the connection stay the session's until the block ends", async () => {
    const reg = db.registry();
    await reg.withSession((s) => s.query("SELECT 1")); // initialize
    const ds = reg.dataSource!;
    let session!: Session;
    const error = await rejectionOf(
      reg.withTransaction(async (s) => {
        session = s;
        await s.query(insertSql(db.kind), ["kept after release", 1]);
        await s.queryRunner.release();
        const released = s.queryRunner.isReleased;
        const rows = await s.query<{ n: number | string }[]>("SELECT count(*) AS n FROM notes");
        throw new Planned(
          JSON.stringify({
            released,
            n: Number(rows[0]!.n),
            inUse: connectionsInUse(ds),
            active: s.queryRunner.isTransactionActive,
          }),
        );
      }),
    );
    expect(error).to.be.instanceOf(Planned);
    expect(JSON.parse((error as Error).message)).to.deep.equal({ released: false, n: 1, inUse: 1, active: true });
    expect(connectionsInUse(ds)).to.equal(0);
    expect(await reg.withSession((s) => s.getRepository(Note).count()), "rolled back after all").to.equal(0);
    // The view of a closed session refuses work.
    expect(await rejectionOf(session.queryRunner.query("SELECT 1"))).to.be.instanceOf(SessionClosedError);
    expect(await rejectionOf(session.queryRunner.startTransaction())).to.be.instanceOf(SessionClosedError);
    expect(await rejectionOf(session.queryRunner.hasTable("notes"))).to.be.instanceOf(SessionClosedError);
    expect(connectionsInUse(ds)).to.equal(0);
  });

  it("schema reads through the view run on the session: a table created in its transaction is there, and gone after the rollback", async () => {
    const reg = db.registry();
    const error = await rejectionOf(
      reg.withTransaction(async (s) => {
        await s.query("CREATE TABLE hp_scratch (id integer)");
        throw new Planned(String(await s.queryRunner.hasTable("hp_scratch")));
      }),
    );
    expect(error).to.be.instanceOf(Planned).with.property("message", "true");
    expect(await reg.withSession((s) => s.queryRunner.hasTable("hp_scratch"))).to.equal(false);
  });

  it("queryRunner.data is per session: what one session stores there, a concurrent or later session does not see", async () => {
    const reg = db.registry();
    const seen = await reg.withSession(async (a) => {
      await a.query("SELECT 1");
      (a.queryRunner.data as Record<string, unknown>).user = "alice";
      const b = await reg.withSession(
        async (b) => {
          await b.query("SELECT 1");
          const before = (b.queryRunner.data as Record<string, unknown>).user;
          (b.queryRunner.data as Record<string, unknown>).user = "bob";
          return { before };
        },
        { propagation: "requiresNew" },
      );
      return { a: (a.queryRunner.data as Record<string, unknown>).user, b: b.before };
    });
    const later = await reg.withSession(async (c) => {
      await c.query("SELECT 1");
      return (c.queryRunner.data as Record<string, unknown>).user;
    });
    expect({ ...seen, later }).to.deep.equal({ a: "alice", b: undefined, later: undefined });
  });
});

// ---------------------------------------------------------------------------
forEachBackend("hot path: a session that never touched the database closes at once", (backend: Backend) => {
  let db: TestDb;
  beforeEach(async () => {
    db = await backend.open();
  });
  afterEach(() => db.dispose());

  it("emits open then close (no connect), counts it, aborts its signal, takes no connection", async () => {
    const reg = db.registry();
    const { log, events } = recordEvents(reg);
    let session!: Session;
    let signal!: AbortSignal;
    let abortedInside = true;
    const value = await reg.withSession((s) => {
      session = s;
      signal = s.signal;
      abortedInside = signal.aborted;
      return 42;
    });
    expect(value).to.equal(42);
    expect(abortedInside).to.equal(false);
    expect(signal.aborted).to.equal(true);
    expect(signal.reason).to.be.instanceOf(SessionClosedError);
    expect(session.closed).to.equal(true);
    expect(log).to.deep.equal([`open#${session.id}`, `close#${session.id}`]);
    expect(events[1]!.durationMs).to.be.a("number");
    // A signal asked for only after the close is aborted too.
    const late = await reg.withSession(async (s) => {
      await turns(1);
      return s;
    });
    expect(late.signal.aborted).to.equal(true);
    // Concurrent idle blocks, each opened and closed once, in order.
    const ids = await Promise.all(
      Array.from({ length: 5 }, () =>
        reg.withSession(async (s) => {
          await turns(1);
          return s.id;
        }),
      ),
    );
    for (const id of ids) {
      const open = log.indexOf(`open#${id}`);
      expect(open, `open#${id}`).to.be.greaterThan(-1);
      expect(log.indexOf(`close#${id}`), `close#${id} after open`).to.be.greaterThan(open);
      expect(log.filter((l) => l === `close#${id}`)).to.have.length(1);
    }
    expect(log.filter((l) => l.startsWith("connect"))).to.deep.equal([]);
    expect(reg.stats()).to.include({ active: 0, opened: 7, closed: 7, peak: 5 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("afterCommit in an idle non-transactional block runs at once; an async one is awaited before the close and the block settle", async () => {
    const reg = db.registry();
    const order: string[] = [];
    const errors: unknown[] = [];
    reg.on("error", (e) => errors.push(e.error));
    reg.on("close", () => order.push("close"));
    const value = await reg
      .withSession((s) => {
        s.afterCommit(() => order.push("sync callback"));
        s.afterCommit(async () => {
          await turns(3);
          order.push("async callback");
        });
        s.afterCommit(() => {
          throw new Planned("callback fails");
        });
        order.push("body returns");
        return "v";
      })
      .then((v) => {
        order.push("block settled");
        return v;
      });
    expect(value).to.equal("v");
    expect(order).to.deep.equal(["sync callback", "body returns", "async callback", "close", "block settled"]);
    expect(errors).to.have.length(1);
    expect(errors[0]).to.be.instanceOf(Planned);
    expect(reg.stats()).to.include({ active: 0, closed: 1 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a block that only reads queryRunner/manager getters closes cleanly without a connection; later use is refused", async () => {
    const reg = db.registry();
    await reg.withSession(() => undefined); // initialize
    const { log } = recordEvents(reg);
    let viewed!: Session;
    const checks = await reg.withSession((s) => {
      viewed = s;
      return {
        runnerManager: s.queryRunner.manager === s.manager,
        notActive: s.queryRunner.isTransactionActive === false,
        notReleased: s.queryRunner.isReleased === false,
        created: s.getRepository(Note).create({ body: "x" }).body,
      };
    });
    expect(checks).to.deep.equal({ runnerManager: true, notActive: true, notReleased: true, created: "x" });
    expect(log).to.deep.equal([`open#${viewed.id}`, `close#${viewed.id}`]);
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    // An idle session closed without ever building its view: building it afterwards takes nothing.
    const idle = await reg.withSession((s) => s);
    const late = {
      viewQuery: await rejectionOf(viewed.queryRunner.query("SELECT 1")),
      viewConnect: await rejectionOf(idle.queryRunner.connect() as Promise<unknown>),
      idleViewQuery: await rejectionOf(idle.queryRunner.query("SELECT 1")),
      idleManager: await rejectionOf(idle.manager.find(Note)),
      idleTransaction: await rejectionOf(idle.manager.transaction(() => Promise.resolve())),
      idleBegin: await rejectionOf(idle.begin()),
    };
    for (const [what, error] of Object.entries(late)) {
      expect(error, what).to.be.instanceOf(SessionClosedError);
    }
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
    expect(log.filter((l) => !l.startsWith("open") && !l.startsWith("close"))).to.deep.equal([]);
    expect(reg.stats()).to.include({ active: 0 });
  });

  it("nested blocks: a joining block leaves the session open; a requiresNew one closes its own at once; events nest", async () => {
    const reg = db.registry();
    await reg.withSession(() => undefined); // initialize
    const { log } = recordEvents(reg);
    const ids = await reg.withSession(async (outer) => {
      const joined = await reg.withSession(async (s) => {
        await turns(1);
        return s;
      });
      const mandatory = await reg.withSession((s) => s, { propagation: "mandatory" });
      const stillOpen = !outer.closed;
      const fresh = await reg.withSession((s) => s, { propagation: "requiresNew" });
      expect({ joined: joined === outer, mandatory: mandatory === outer, stillOpen }).to.deep.equal({
        joined: true,
        mandatory: true,
        stillOpen: true,
      });
      expect(fresh.closed).to.equal(true);
      expect(outer.closed).to.equal(false);
      return [outer.id, fresh.id];
    });
    const [o, f] = ids as [number, number];
    expect(log).to.deep.equal([`open#${o}`, `open#${f}`, `close#${f}`, `close#${o}`]);
    expect(reg.stats()).to.include({ active: 0 });
  });

  it("an idle body that times out closes once; drain() waiting on an idle session resolves when it ends", async () => {
    const reg = db.registry();
    await reg.withSession(() => undefined); // initialize
    const { log } = recordEvents(reg, ["open", "close"]);
    const never = deferred();
    let timedOut!: Session;
    const error = await rejectionOf(
      reg.withSession(
        async (s) => {
          timedOut = s;
          await never.promise;
        },
        { timeoutMs: 10 },
      ),
    );
    expect(error).to.be.instanceOf(SessionTimeoutError);
    expect(timedOut.closed).to.equal(true);
    expect(timedOut.signal.aborted).to.equal(true);
    never.resolve(); // the abandoned body ends now: nothing more to close
    await turns(3);
    expect(log).to.deep.equal([`open#${timedOut.id}`, `close#${timedOut.id}`]);
    expect(reg.stats()).to.include({ active: 0, timeouts: 1 });

    const entered = deferred();
    const leave = deferred();
    const block = reg.withSession(async () => {
      entered.resolve();
      await leave.promise;
      return "done";
    });
    await entered.promise;
    const draining = reg.drain();
    leave.resolve();
    expect(await block).to.equal("done");
    expect(await draining).to.deep.equal({ waited: 1, forced: 0 });
  });
});

// ---------------------------------------------------------------------------
describe("hot path: SQLite statements outside transactions share the connection lease", () => {
  let db: TempSqlite;
  beforeEach(() => {
    db = new TempSqlite();
  });
  afterEach(async () => {
    sinon.restore();
    await db.dispose();
  });

  /**
   * Wrap the shared driver runner's `query`. Every statement is reported to `onEnter`
   * as it reaches the driver, with the statements that reached it before and are not
   * answered yet; statements whose SQL contains a key of `gates` then wait for its
   * promise before they are sent (they stay in flight meanwhile).
   */
  function instrument(
    ds: DataSource,
    gates: Map<string, Promise<void>>,
    onEnter: (sql: string, pending: string[]) => void,
  ): void {
    const shared = ds.driver.createQueryRunner("master") as unknown as {
      query: (sql: string, ...rest: unknown[]) => Promise<unknown>;
    };
    const query = shared.query;
    const pending: string[] = [];
    sinon.replace(shared, "query", async function (this: typeof shared, sql: string, ...rest: unknown[]) {
      onEnter(sql, [...pending]);
      pending.push(sql);
      try {
        for (const [key, gate] of gates) if (sql.includes(key)) await gate;
        return await query.call(this, sql, ...rest);
      } finally {
        pending.splice(pending.indexOf(sql), 1);
      }
    });
  }

  it("seeded mixes of readers, failing writers, savepoints, manager transactions and requiresNew children: no reader sees uncommitted or partial work", async function () {
    this.timeout(120_000);
    const reg = db.registry();
    await reg.withSession((s) => s.query("SELECT 1"));
    const sql = insertSql("sqlite");
    let next = 1;
    const expected = new Map<number, number>(); // block -> rows committed
    const snapshots: number[][] = [];
    const violations: string[] = [];
    const read = async (s: Session): Promise<void> => {
      const rows = await s.query<{ block: number }[]>("SELECT block FROM notes");
      snapshots.push(rows.map((r) => r.block));
    };
    const write = async (s: Session | EntityManager, block: number, fails: boolean, yieldMid: boolean) => {
      await s.query(sql, ["w1", block]);
      if (yieldMid) await turns(2);
      await s.query(sql, ["w2", block]);
      if (fails) throw new Planned(`block ${block}`);
    };
    const planned = (e: unknown): false => {
      if (!(e instanceof Planned)) violations.push(`unexpected error: ${String(e)}`);
      return false;
    };
    for (const seed of [11, 12, 13]) {
      const random = seeded(seed);
      const blocks: Promise<unknown>[] = [];
      for (let i = 0; i < 150; i++) {
        const k = random();
        const fails = random() < 0.4;
        const yieldMid = random() < 0.5;
        const id = next++;
        if (k < 0.35) {
          // readers outside any transaction, sometimes two side by side in one session
          blocks.push(
            reg.withSession(async (s) => {
              // spread over the run, so that reads meet transactions at every stage
              const pauses = [0, 1, 2].map(() => Math.floor(random() * 4));
              for (const pause of pauses) {
                await turns(pause);
                await (yieldMid ? Promise.all([read(s), read(s)]) : read(s));
              }
            }),
          );
        } else if (k < 0.55) {
          blocks.push(
            reg.withTransaction((s) => write(s, id, fails, yieldMid)).then(() => expected.set(id, 2), planned),
          );
        } else if (k < 0.7) {
          // a writer with a savepoint that may fail; the outer block may fail after it
          const innerId = next++;
          const outerFails = random() < 0.3;
          blocks.push(
            reg
              .withTransaction(async (s) => {
                await write(s, id, false, yieldMid);
                const inner = await reg
                  .withTransaction((t) => write(t, innerId, fails, !yieldMid))
                  .then(() => true, planned);
                if (outerFails) throw new Planned("outer");
                return inner;
              })
              .then((inner) => {
                expected.set(id, 2);
                if (inner) expected.set(innerId, 2);
              }, planned),
          );
        } else if (k < 0.85) {
          // a non-transactional parent that reads while a requiresNew child writes
          blocks.push(
            reg.withSession(async (p) => {
              const [, child] = await Promise.all([
                read(p),
                reg
                  .withTransaction((c) => write(c, id, fails, yieldMid), { propagation: "requiresNew" })
                  .then(() => true, planned),
              ]);
              if (child) expected.set(id, 2);
              await read(p);
            }),
          );
        } else {
          // manager.transaction() with a read of the same session from a sibling frame
          blocks.push(
            reg.withSession(async (s) => {
              const [ok] = await Promise.all([
                s.manager.transaction((m) => write(m, id, fails, yieldMid)).then(() => true, planned),
                read(s),
              ]);
              if (ok) expected.set(id, 2);
            }),
          );
        }
      }
      await Promise.all(blocks);
    }
    expect(violations).to.deep.equal([]);
    const final = new Map<number, number>();
    for (const { block } of await reg.withSession((s) => s.query<{ block: number }[]>("SELECT block FROM notes"))) {
      final.set(block, (final.get(block) ?? 0) + 1);
    }
    expect([...final].sort((x, y) => x[0] - y[0])).to.deep.equal([...expected].sort((x, y) => x[0] - y[0]));
    const seenWrong: string[] = [];
    for (const snapshot of snapshots) {
      const counts = new Map<number, number>();
      for (const block of snapshot) counts.set(block, (counts.get(block) ?? 0) + 1);
      for (const [block, n] of counts) {
        if (!expected.has(block)) seenWrong.push(`block ${block}: read rows that were rolled back`);
        else if (n !== expected.get(block))
          seenWrong.push(`block ${block}: read ${n} of its ${expected.get(block)} rows`);
      }
    }
    expect(seenWrong.slice(0, 10)).to.deep.equal([]);
    expect(snapshots.length).to.be.greaterThan(200);
    expect(snapshots.filter((s) => s.length > 0).length, "readers saw committed work").to.be.greaterThan(100);
    expect(reg.stats()).to.include({ active: 0 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a session with a statement waiting or in flight that then begins a transaction does not deadlock", async () => {
    const reg = db.registry();
    const sql = insertSql("sqlite");
    // In flight, granted at once: its own BEGIN waits for it.
    const first = await reg.withSession(async (s) => {
      const read = s.query<{ n: number }[]>("SELECT count(*) AS n FROM notes");
      await s.begin();
      await s.query(sql, ["own", 1]);
      await s.commit();
      return (await read)[0]!.n;
    });
    expect(first).to.equal(0);
    // Waiting behind another session's transaction, then its own BEGIN queues behind it.
    const holding = deferred();
    const leave = deferred();
    const other = reg.withTransaction(async (t) => {
      await t.query(sql, ["other", 2]);
      holding.resolve();
      await leave.promise;
    });
    await holding.promise;
    const second = reg.withSession(async (s) => {
      const read = s.query<{ n: number }[]>("SELECT count(*) AS n FROM notes");
      const began = s.begin();
      leave.resolve();
      const [rows] = await Promise.all([read, began]);
      await s.query(sql, ["own", 3]);
      await s.commit();
      return rows[0]!.n;
    });
    await other;
    expect(await second, "the read ran after the other transaction committed").to.equal(2);
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(3);
    expect(reg.stats()).to.include({ active: 0 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("statements and transactions that time out, or are removed, while waiting for the connection leave it usable for everyone", async () => {
    const reg = db.registry();
    const sql = insertSql("sqlite");
    const holding = deferred();
    const leave = deferred();
    const holder = reg.withTransaction(async (s) => {
      await s.query(sql, ["holder", 1]);
      holding.resolve();
      await leave.promise;
    });
    await holding.promise;
    const queuedRead = reg.withSession((s) => s.query("SELECT count(*) AS n FROM notes"), {
      timeoutMs: 20,
      name: "queued read",
    });
    const queuedTx = reg.withTransaction((s) => s.query(sql, ["timed out", 2]), { timeoutMs: 20, name: "queued tx" });
    const removed = reg.scope(async () => {
      const waiting = reg.current().query("SELECT 1");
      await reg.remove();
      return rejectionOf(waiting);
    });
    const laterRead = reg.withSession((s) => s.query<{ n: number }[]>("SELECT count(*) AS n FROM notes"));
    const laterTx = reg.withTransaction((s) => s.query(sql, ["later", 3]));
    expect(await rejectionOf(queuedRead)).to.be.instanceOf(SessionTimeoutError);
    expect(await rejectionOf(queuedTx)).to.be.instanceOf(SessionTimeoutError);
    expect(await removed).to.be.instanceOf(SessionClosedError);
    leave.resolve();
    await holder;
    expect((await laterRead)[0]!.n).to.equal(1);
    await laterTx;
    // Everybody may use the connection: readers side by side and a transaction.
    const [count, , count2] = await Promise.all([
      reg.withSession((s) => s.getRepository(Note).count()),
      reg.withTransaction((s) => s.query(sql, ["last", 4])),
      reg.withSession((s) => s.getRepository(Note).count()),
    ]);
    expect([count, count2]).to.deep.equal([2, 3]);
    const bodies = await reg.withSession(async (s) => (await s.getRepository(Note).find()).map((n) => n.body).sort());
    expect(bodies).to.deep.equal(["holder", "last", "later"]);
    expect(reg.stats()).to.include({ active: 0, timeouts: 2 });
    expect(connectionsInUse(reg.dataSource!)).to.equal(0);
  });

  it("a session that times out with a statement in flight in its transaction does not give back another session's shared hold", async () => {
    const reg = db.registry();
    await reg.withSession((s) => s.query("SELECT 1")); // initialize
    const sql = insertSql("sqlite");
    const slowA = deferred();
    const slowB = deferred();
    const overlaps: string[] = [];
    const cBegan = deferred();
    instrument(
      reg.dataSource!,
      new Map([
        ["'slow-a'", slowA.promise],
        ["'slow-b'", slowB.promise],
      ]),
      (sent, pending) => {
        if (sent.startsWith("BEGIN") && pending.some((u) => u.includes("'slow-b'"))) {
          overlaps.push("a transaction began while another session's read was in flight");
          cBegan.resolve();
        }
      },
    );
    // A's abandoned statement ends once the timeout has fired: closing waits for it
    // (so that it cannot run after the ROLLBACK), then gives back what A holds. Listening
    // from the start: on a loaded machine the timeout may fire before A's first statement
    // is answered.
    reg.on("timeout", () => slowA.resolve());
    const aStarted = deferred();
    const aStatementDone = deferred();
    const a = reg.withTransaction(
      async (s) => {
        await s.query("SELECT 1");
        aStarted.resolve();
        try {
          await s.query("SELECT 'slow-a'");
        } finally {
          aStatementDone.resolve(); // answered or refused: either way it is over
        }
      },
      { timeoutMs: 30, name: "a" },
    );
    await aStarted.promise;
    // B reads outside a transaction: it waits for A's transaction, then holds the lease shared.
    const b = reg.withSession((s) => s.query<{ n: number }[]>("SELECT 'slow-b' AS tag, count(*) AS n FROM notes"));
    // C's transaction waits behind B.
    const cInserted = deferred();
    const cGo = deferred();
    const c = reg.withTransaction(async (s) => {
      await s.query(sql, ["uncommitted", 3]);
      cInserted.resolve();
      await cGo.promise;
      throw new Planned("c rolls back");
    });
    expect(await rejectionOf(a)).to.be.instanceOf(SessionTimeoutError);
    await aStatementDone.promise;
    // C must keep waiting for B's read: give it every chance to (wrongly) begin. If it does,
    // let it insert before B's read is answered, to show what B then reads.
    await Promise.race([cBegan.promise, turns(30)]);
    if (overlaps.length > 0) await cInserted.promise;
    slowB.resolve();
    const rows = await b;
    cGo.resolve();
    expect(await rejectionOf(c)).to.be.instanceOf(Planned);
    expect({ overlaps, bRead: Number(rows[0]!.n) }).to.deep.equal({ overlaps: [], bRead: 0 });
    expect(reg.stats()).to.include({ active: 0 });
  });

  it("drain() while many shared statements are queued: the one in flight is answered, the queued ones are refused, and a transaction waits", async () => {
    const reg = db.registry();
    await reg.withSession((s) => s.query("SELECT 1")); // initialize
    const ds = reg.dataSource!;
    const N = 16;
    const gate = deferred();
    let gated = 0;
    const allGated = deferred();
    const overlaps: string[] = [];
    instrument(ds, new Map([["hp-gate", gate.promise]]), (sent, pending) => {
      // One statement at a time on the connection (guarantee 10): the first holds the others back.
      if (sent.includes("hp-gate") && ++gated === 1) allGated.resolve();
      if (sent.startsWith("BEGIN") && pending.some((u) => u.includes("hp-gate"))) {
        overlaps.push(`BEGIN sent with ${pending.length} reads unanswered`);
      }
    });
    const sessions: Session[] = [];
    const readers = Array.from({ length: N }, (_, i) =>
      reg.withSession((s) => {
        sessions.push(s);
        return s.query(`SELECT ${i} AS i, 'hp-gate' AS g, count(*) AS n FROM notes`);
      }),
    );
    await allGated.promise;
    for (let i = 0; i < 1000 && sessions.length < N; i++) await turns(1);
    expect(sessions).to.have.length(N);
    // Forcing the sessions closed (once drain's timer fires) waits for the statement in flight.
    const draining = reg.drain({ timeoutMs: 0 });
    for (let i = 0; i < 100_000 && !sessions.every((s) => s.closed); i++) await turns(1);
    expect(
      sessions.every((s) => s.closed),
      "drain() force-closes the sessions",
    ).to.equal(true);
    const other = createSessionRegistry({ name: "other", dataSource: ds });
    const writer = other.withTransaction((s) => s.query(insertSql("sqlite"), ["after drain", 1]));
    await turns(10);
    gate.resolve();
    expect(await draining).to.deep.equal({ waited: 0, forced: N });
    expect(gated, "queued statements of closed sessions are never sent").to.equal(1);
    for (const outcome of await Promise.allSettled(readers)) {
      expect(outcome.status === "rejected" && outcome.reason).to.be.instanceOf(SessionClosedError);
    }
    await writer;
    expect(overlaps).to.deep.equal([]);
    reg.configure({ dataSource: ds });
    expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(1);
    expect(reg.stats()).to.include({ active: 0 });
    expect(other.stats()).to.include({ active: 0, commits: 1 });
  });
});
