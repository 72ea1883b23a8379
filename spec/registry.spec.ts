import { expect } from "chai";
import {
  configureSessions,
  createSessionRegistry,
  currentSession,
  defaultRegistry,
  NoActiveSessionError,
  parseUrl,
  RegistryBusyError,
  RegistryNotConfiguredError,
  SessionRegistry,
  tryCurrentSession,
  withSession,
  withTransaction,
} from "../src/index.js";
import { Note } from "./support/entities.js";
import { ENTITIES, TempSqlite } from "./support/sqlite.js";
import { deferred, recordEvents, rejectionOf } from "./support/util.js";

describe("SessionRegistry", () => {
  let db: TempSqlite;
  beforeEach(() => {
    db = new TempSqlite();
  });
  afterEach(() => db.dispose());

  describe("data source", () => {
    it("initializes its DataSource on first use", async () => {
      const ds = db.dataSource();
      const reg = createSessionRegistry({ dataSource: ds });
      expect(ds.isInitialized).to.equal(false);
      await reg.withSession(() => undefined);
      expect(ds.isInitialized).to.equal(true);
      expect(reg.dataSource).to.equal(ds);
    });

    it("accepts a function returning a DataSource (or a promise of one), called once", async () => {
      let calls = 0;
      const reg = createSessionRegistry({
        dataSource: async () => {
          calls += 1;
          return db.dataSource();
        },
      });
      await Promise.all([reg.withSession(() => 1), reg.withSession(() => 2)]);
      await reg.withSession(() => 3);
      expect(calls).to.equal(1);
    });

    it("builds the DataSource from url: with the other options passed through", async () => {
      const reg = createSessionRegistry({ url: `sqlite:${db.path}`, entities: ENTITIES, synchronize: true });
      try {
        await reg.withTransaction((s) => s.getRepository(Note).insert({ body: "via url", block: 1 }));
        expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(1);
        expect(reg.dataSource!.options).to.include({ database: db.path, synchronize: true });
        // TypeORM 1.x has only the better-sqlite3 driver: `sqlite:` URLs use it there.
        expect(reg.dataSource!.options.type).to.be.oneOf(["sqlite", "better-sqlite3"]);
      } finally {
        await reg.dataSource?.destroy();
      }
    });

    it("url: sqlite::memory: is an in-memory database", async () => {
      const reg = createSessionRegistry({ url: "sqlite::memory:", entities: ENTITIES, synchronize: true });
      try {
        expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(0);
        expect(reg.dataSource!.options).to.include({ database: ":memory:" });
      } finally {
        await reg.dataSource?.destroy();
      }
    });

    it("parses the documented URL forms", () => {
      expect(parseUrl("sqlite:./app.db")).to.deep.equal({ type: "sqlite", database: "./app.db" });
      expect(parseUrl("sqlite::memory:")).to.deep.equal({ type: "sqlite", database: ":memory:" });
      expect(parseUrl("better-sqlite3:./app.db")).to.deep.equal({ type: "better-sqlite3", database: "./app.db" });
      expect(parseUrl("postgres://u:p@h:5432/d")).to.deep.equal({ type: "postgres", url: "postgres://u:p@h:5432/d" });
      expect(parseUrl("postgresql://h/d")).to.deep.equal({ type: "postgres", url: "postgresql://h/d" });
      expect(() => parseUrl("mssql://h/d")).to.throw(
        RangeError,
        /`url` to start with sqlite:.*mariadb:\/\/, got `"mssql:\/\/h\/d"` \(string\)/,
      );
      expect(parseUrl("mysql://u:p@h:3306/d")).to.deep.equal({ type: "mysql", url: "mysql://u:p@h:3306/d" });
      expect(() => parseUrl("sqlite:")).to.throw(RangeError, /database path/);
      expect(() => parseUrl(5)).to.throw(TypeError, /`url` to be a string, got `5` \(number\)/);
    });

    it("rejects both dataSource and url, and a non-DataSource", () => {
      expect(() => createSessionRegistry({ dataSource: db.dataSource(), url: "sqlite::memory:" } as never)).to.throw(
        TypeError,
        /either/,
      );
      expect(() => createSessionRegistry({ dataSource: 42 } as never)).to.throw(
        TypeError,
        /`dataSource`.*got `42` \(number\)/,
      );
    });

    it("a registry without a data source rejects with RegistryNotConfiguredError", async () => {
      const reg = createSessionRegistry({ name: "empty" });
      const error = await rejectionOf(reg.withSession(() => 1));
      expect(error).to.be.instanceOf(RegistryNotConfiguredError);
      expect(error).to.have.property("code", "ERR_REGISTRY_NOT_CONFIGURED");
      expect((error as Error).message).to.match(/"empty".*configureSessions/);
    });

    it("a failed initialization rejects, and a later block tries again", async () => {
      let attempt = 0;
      const reg = createSessionRegistry({
        dataSource: () => {
          attempt += 1;
          if (attempt === 1) throw new Error("config not loaded yet");
          return db.dataSource();
        },
      });
      expect(String(await rejectionOf(reg.withSession(() => 1)))).to.match(/config not loaded yet/);
      expect(await reg.withSession(() => "second try")).to.equal("second try");
    });
  });

  describe("configure (late binding)", () => {
    it("binds a registry created before its DataSource existed", async () => {
      const reg = createSessionRegistry({ name: "late" });
      reg.configure({ dataSource: db.dataSource() });
      expect(await reg.withSession((s) => s.query("SELECT 1 AS one"))).to.deep.equal([{ one: 1 }]);
    });

    it("throws RegistryBusyError while sessions are open", async () => {
      const reg = db.registry("busy");
      const release = deferred();
      const opened = deferred();
      reg.on("open", () => opened.resolve());
      const open = reg.withSession(() => release.promise);
      await opened.promise;
      expect(() => reg.configure({ dataSource: db.dataSource() })).to.throw(RegistryBusyError, /"busy".*1 session/);
      release.resolve();
      await open;
      expect(() => reg.configure({ dataSource: db.dataSource() })).not.to.throw();
    });
  });

  describe("the default registry and the bare functions", () => {
    afterEach(() => configureSessions({ name: "default" }));

    it("configureSessions() binds defaultRegistry, which withSession and friends use", async () => {
      configureSessions({ dataSource: db.dataSource() });
      expect(defaultRegistry).to.be.instanceOf(SessionRegistry);
      expect(defaultRegistry.name).to.equal("default");
      expect(tryCurrentSession()).to.equal(undefined);
      await withSession(async (s) => {
        expect(currentSession()).to.equal(s);
        expect(tryCurrentSession()).to.equal(s);
        await withTransaction(async (t) => {
          expect(t).to.equal(s);
          await t.getRepository(Note).insert({ body: "default", block: 1 });
        });
      });
      expect(await withSession((s) => s.getRepository(Note).count())).to.equal(1);
    });

    it("currentSession() outside a scope names the ways to open one", () => {
      const error = (() => {
        try {
          currentSession();
        } catch (e) {
          return e as NoActiveSessionError;
        }
        throw new Error("expected a throw");
      })();
      expect(error).to.be.instanceOf(NoActiveSessionError);
      expect(error.code).to.equal("ERR_NO_ACTIVE_SESSION");
      expect(error.message).to.match(/withSession.*@UsesSession.*sessionMiddleware/s);
    });
  });

  describe("several registries side by side", () => {
    it("keep separate sessions and databases, also when nested", async () => {
      const other = new TempSqlite();
      try {
        const a = db.registry("a");
        const b = other.registry("b");
        await a.withSession(async (sa) => {
          await b.withTransaction(async (sb) => {
            expect(sb).not.to.equal(sa);
            expect(a.current()).to.equal(sa);
            expect(b.current()).to.equal(sb);
            await sb.getRepository(Note).insert({ body: "in b", block: 1 });
            await a.withTransaction((t) => t.getRepository(Note).insert({ body: "in a", block: 2 }));
          });
          expect(b.tryCurrent()).to.equal(undefined);
        });
        expect(await a.withSession((s) => s.getRepository(Note).find())).to.have.length(1);
        expect((await b.withSession((s) => s.getRepository(Note).find()))[0]!.body).to.equal("in b");
      } finally {
        await other.dispose();
      }
    });
  });

  describe("scoped proxies", () => {
    it("registry.manager and getRepository() resolve to the current scope's session", async () => {
      const reg = db.registry();
      const notes = reg.getRepository(Note);
      expect(reg.getRepository(Note)).to.equal(notes);
      const { log } = recordEvents(reg, ["open"]);
      await reg.withTransaction(async (s) => {
        await notes.insert({ body: "via proxy", block: 1 });
        expect(await reg.manager.count(Note)).to.equal(1);
        expect(reg.manager.connection).to.equal(s.manager.connection);
        expect(notes.create({ body: "sync method" }).body).to.equal("sync method");
        expect(await s.getRepository(Note).count()).to.equal(1);
      });
      expect(log).to.have.length(1);
    });

    it("outside a scope: async methods reject, sync methods throw, getting the proxy never fails", async () => {
      const reg = db.registry("p");
      const notes = reg.getRepository(Note);
      const manager = reg.manager;
      expect(await rejectionOf(notes.find())).to.be.instanceOf(NoActiveSessionError);
      expect(await rejectionOf(manager.find(Note))).to.be.instanceOf(NoActiveSessionError);
      expect(() => notes.create({ body: "x" })).to.throw(NoActiveSessionError);
      expect(() => manager.createQueryBuilder(Note, "n")).to.throw(NoActiveSessionError);
    });

    it("can be returned from async code (not thenable)", async () => {
      const reg = db.registry();
      const got = await (async () => reg.getRepository(Note))();
      expect(got).to.equal(reg.getRepository(Note));
    });
  });

  describe("scope()", () => {
    it("creates its session on first use only, and removes it when fn settles", async () => {
      const reg = db.registry();
      const { log } = recordEvents(reg, ["open", "close"]);
      expect(await reg.scope(async () => "no database")).to.equal("no database");
      expect(log).to.deep.equal([]);
      const s = await reg.scope(async () => {
        const first = reg.current();
        expect(reg.current()).to.equal(first);
        await reg.getRepository(Note).count();
        return first;
      });
      expect(s.closed).to.equal(true);
      expect(log).to.deep.equal([`open#${s.id}`, `close#${s.id}`]);
    });

    it("tryCurrent() inside a scope does not create a session", async () => {
      const reg = db.registry();
      const { log } = recordEvents(reg, ["open"]);
      await reg.scope(() => expect(reg.tryCurrent()).to.equal(undefined));
      expect(log).to.deep.equal([]);
    });
  });

  describe("events and stats", () => {
    it("emit open, connect, begin, commit, close in order with payloads", async () => {
      const reg = db.registry();
      const { log, events } = recordEvents(reg);
      const id = await reg.withTransaction(async (s) => (await s.query("SELECT 1"), s.id), { name: "job" });
      expect(log).to.deep.equal([`open#${id}`, `connect#${id}`, `begin#${id}`, `commit#${id}`, `close#${id}`]);
      expect(events.every((e) => e.name === "job")).to.equal(true);
      expect(events.find((e) => e.event === "commit")!.durationMs).to.be.a("number");
      expect(events.find((e) => e.event === "close")!.durationMs).to.be.a("number");
    });

    it("a listener that throws is reported through error and does not break the block", async () => {
      const reg = db.registry();
      const errors: unknown[] = [];
      reg.on("error", (e) => errors.push(e.error));
      reg.on("open", () => {
        throw new Error("bad listener");
      });
      expect(await reg.withSession(() => "fine")).to.equal("fine");
      expect(errors.map(String)).to.deep.equal(["Error: bad listener"]);
    });

    it("off() removes a listener; on() validates its arguments", async () => {
      const reg = db.registry();
      let calls = 0;
      const listener = () => (calls += 1);
      reg.on("open", listener);
      await reg.withSession(() => undefined);
      reg.off("open", listener);
      await reg.withSession(() => undefined);
      expect(calls).to.equal(1);
      expect(() => reg.on("opened" as never, listener)).to.throw(RangeError, /got `"opened"`/);
      expect(() => reg.on("open", "x" as never)).to.throw(TypeError);
    });

    it("stats() counts sessions, the peak, commits, rollbacks and statements", async () => {
      const reg = db.registry();
      await reg.withSession(() => undefined); // initialized
      const gate = deferred();
      const started = [deferred(), deferred(), deferred()];
      const blocks = started.map((d) => reg.withSession(() => (d.resolve(), gate.promise)));
      await Promise.all(started.map((d) => d.promise));
      expect(reg.stats()).to.include({ active: 3, peak: 3 });
      gate.resolve();
      await Promise.all(blocks);
      await reg.withTransaction(async () => undefined);
      await rejectionOf(reg.withTransaction(async () => Promise.reject(new Error("x"))));
      await reg.withTransaction(async () => reg.withTransaction(async () => undefined)); // savepoints do not count
      await reg.withSession((s) => s.query("SELECT 1")); // BEGIN, COMMIT and ROLLBACK are not statements
      expect(reg.stats()).to.deep.equal({
        active: 0,
        peak: 3,
        opened: 8,
        closed: 8,
        commits: 2,
        rollbacks: 1,
        timeouts: 0,
        leaks: 0,
        statements: 1,
      });
    });
  });

  it("uses a DataSource another part of the app initialized already", async () => {
    const ds = db.dataSource();
    await ds.initialize();
    try {
      const reg = createSessionRegistry({ dataSource: ds });
      expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(0);
    } finally {
      await ds.destroy();
    }
  });
});
