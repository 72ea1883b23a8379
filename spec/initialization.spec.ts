import { expect } from "chai";
import type { DataSource } from "typeorm";
import { createSessionRegistry, RegistryNotConfiguredError } from "../src/index.js";
import { forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { deferred, rejectionOf } from "./support/util.js";

/** Count the driver's connects (one per initialization), and optionally hold each open until `gate`. */
function countConnects(ds: DataSource, gate?: Promise<void>, connected?: () => void): { count: number } {
  const counter = { count: 0 };
  const driver = ds.driver as unknown as { connect: () => Promise<void> };
  const connect = driver.connect.bind(driver);
  driver.connect = async () => {
    counter.count += 1;
    await connect();
    connected?.();
    if (gate !== undefined) await gate;
  };
  return counter;
}

/** Whether the DataSource holds no connection any more (the pool of PostgreSQL ended, SQLite closed). */
function released(ds: DataSource): boolean {
  const pool = (ds.driver as unknown as { master?: { totalCount: number } }).master;
  return !ds.isInitialized && (pool === undefined || pool.totalCount === 0);
}

forEachBackend("one initialization per DataSource", (backend) => {
  let db: TestDb;
  beforeEach(async () => {
    db = await backend.open();
  });
  afterEach(() => db.dispose());

  it("the app's un-awaited initialize() and two registries' first use initialize it once", async () => {
    const ds = db.dataSource({ synchronize: true });
    const connects = countConnects(ds);
    const a = createSessionRegistry({ name: "a", dataSource: ds });
    const b = createSessionRegistry({ name: "b", dataSource: ds });
    const app = ds.initialize(); // what an app does before listen(), without awaiting
    const [x, y] = await Promise.all([
      a.withTransaction((s) => s.getRepository(Note).insert({ body: "a", block: 1 })).then(() => "a"),
      b.withSession((s) => s.getRepository(Note).count()),
      app,
    ]);
    expect(x).to.equal("a");
    expect(y).to.be.a("number");
    expect(connects.count).to.equal(1);
    expect(ds.isInitialized).to.equal(true);
    await a.drain();
    await b.drain({ destroy: true });
    expect(released(ds)).to.equal(true);
  });

  it("registries first, then the app's own initialize() joins theirs", async () => {
    const ds = db.dataSource({ synchronize: true });
    const connects = countConnects(ds);
    const a = createSessionRegistry({ name: "a", dataSource: ds });
    const b = createSessionRegistry({ name: "b", dataSource: () => ds });
    const first = Promise.all([a.ready(), b.withSession((s) => s.getRepository(Note).count())]);
    expect(await ds.initialize()).to.equal(ds);
    await first;
    expect(connects.count).to.equal(1);
    await b.drain({ destroy: true });
    expect(released(ds)).to.equal(true);
  });

  it("ready() initializes eagerly and rejects with the initialization's error, or RegistryNotConfiguredError", async () => {
    const ds = db.dataSource();
    const reg = createSessionRegistry({ dataSource: ds });
    await reg.ready();
    expect(ds.isInitialized).to.equal(true);
    await reg.ready(); // ready already: resolves at once
    expect(await rejectionOf(createSessionRegistry({ name: "bare" }).ready())).to.be.instanceOf(
      RegistryNotConfiguredError,
    );
    const down = db.dataSource();
    const failure = new Error("database is down");
    (down.driver as unknown as { connect: () => Promise<void> }).connect = () => Promise.reject(failure);
    expect(await rejectionOf(createSessionRegistry({ dataSource: down }).ready())).to.equal(failure);
  });

  if (backend.kind === "postgres") {
    it("an initialize() the app started before the registry saw the DataSource is waited for, not repeated", async () => {
      const ds = db.dataSource();
      const gate = deferred();
      const connected = deferred();
      const connects = countConnects(ds, gate.promise, connected.resolve);
      const app = ds.initialize(); // before any registry knows the DataSource
      await connected.promise; // the pool is up; initialize() is still in flight
      const reg = createSessionRegistry({ dataSource: () => ds });
      const count = reg.withSession((s) => s.getRepository(Note).count());
      gate.resolve();
      await app;
      expect(await count).to.be.a("number");
      expect(connects.count).to.equal(1);
      await reg.drain({ destroy: true });
      expect(released(ds)).to.equal(true);
    });
  }
});
