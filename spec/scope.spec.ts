import { EventEmitter } from "node:events";
import { expect } from "chai";
import { type Session, type SessionRegistry } from "../src/index.js";
import { type Backend, type BackendKind, forEachBackend, type TestDb } from "./support/backends.js";
import { seeded, turns } from "./support/util.js";

forEachBackend("guarantee 4: scopes never bleed", { mariadb: true }, (backend: Backend<BackendKind>) => {
  let db: TestDb<BackendKind>;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
  });
  afterEach(() => db.dispose());

  /** Where a block looks for its session, each a different way for async context to travel. */
  function sightings(shared: EventEmitter): Promise<Session>[] {
    const seen = (): Session => reg.current();
    return [
      (async () => {
        await Promise.resolve();
        return seen();
      })(),
      new Promise((resolve) => setTimeout(() => resolve(seen()), 1)),
      new Promise((resolve) => setImmediate(() => resolve(seen()))),
      new Promise((resolve) => process.nextTick(() => resolve(seen()))),
      new Promise((resolve) => queueMicrotask(() => resolve(seen()))),
      new Promise((resolve) => {
        // Listener registered inside the block on an emitter shared by all blocks.
        shared.once(`ping-${seen().id}`, () => resolve(seen()));
        setImmediate(() => shared.emit(`ping-${seen().id}`));
      }),
    ];
  }

  it("concurrent blocks see only their own session across awaits, timers, setImmediate, nextTick, microtasks and emitters", async () => {
    const shared = new EventEmitter();
    shared.setMaxListeners(0);
    const random = seeded(4);
    const results = await Promise.all(
      Array.from({ length: 200 }, (_, i) =>
        reg.withSession(
          async (s) => {
            if (random() < 0.5) await turns(1);
            await s.query("SELECT 1");
            const seen = await Promise.all(sightings(shared));
            return { own: s, seen, i };
          },
          { transaction: i % 3 === 0 },
        ),
      ),
    );
    const ids = new Set(results.map((r) => r.own.id));
    expect(ids.size).to.equal(200);
    for (const r of results) for (const s of r.seen) expect(s, `block ${r.i}`).to.equal(r.own);
  });

  it("an EventEmitter listener registered outside any scope runs in the scope of the code that emits", async () => {
    const bus = new EventEmitter();
    const got: [number, number][] = [];
    bus.on("saved", (id: number) => got.push([id, reg.current().id]));
    const ids = await Promise.all(
      [1, 2, 3].map(() =>
        reg.withSession(async (s) => {
          await turns(1);
          bus.emit("saved", s.id);
          return s.id;
        }),
      ),
    );
    expect(got.map(([a]) => a).sort()).to.deep.equal([...ids].sort());
    for (const [emitted, seen] of got) expect(seen).to.equal(emitted);
  });

  it("sibling requiresNew blocks under Promise.all inside a parent each keep their own session", async () => {
    const shared = new EventEmitter();
    shared.setMaxListeners(0);
    await reg.withSession(async (parent) => {
      const siblings = await Promise.all(
        Array.from({ length: 20 }, () =>
          reg.withSession(
            async (s) => {
              await s.query("SELECT 1");
              return { own: s, seen: await Promise.all(sightings(shared)) };
            },
            { propagation: "requiresNew" },
          ),
        ),
      );
      const ids = new Set(siblings.map((r) => r.own.id));
      expect(ids.size).to.equal(20);
      expect(ids.has(parent.id)).to.equal(false);
      for (const r of siblings) for (const s of r.seen) expect(s).to.equal(r.own);
      expect(reg.current()).to.equal(parent);
    });
  });

  it("code outside every block has no session", async () => {
    await reg.withSession(async () => undefined);
    expect(reg.tryCurrent()).to.equal(undefined);
    expect(() => reg.current()).to.throw(/outside a session scope/);
  });

  it("a timer scheduled inside a block that fires after it ended sees that closed session, not a new one", async () => {
    let late!: Promise<string>;
    await reg.withSession(async () => {
      late = new Promise((resolve) =>
        setTimeout(() => {
          try {
            reg.current();
            resolve("got a session");
          } catch (error) {
            resolve((error as Error).name);
          }
        }, 5),
      );
    });
    expect(await late).to.equal("SessionClosedError");
  });
});
