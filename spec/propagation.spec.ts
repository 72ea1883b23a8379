import { expect } from "chai";
import {
  NoActiveSessionError,
  PropagationError,
  type Session,
  type SessionRegistry,
  TransactionNotActiveError,
} from "../src/index.js";
import { Note } from "./support/entities.js";
import { type Backend, type BackendKind, forEachBackend, type TestDb } from "./support/backends.js";
import { deferred, recordEvents, rejectionOf } from "./support/util.js";

class Boom extends Error {}

forEachBackend("propagation", { mariadb: true }, (backend: Backend<BackendKind>) => {
  let db: TestDb<BackendKind>;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry();
  });
  afterEach(() => db.dispose());

  const bodies = () =>
    reg.withSession(async (s) => (await s.getRepository(Note).find({ order: { id: "ASC" } })).map((n) => n.body));
  const insert = (s: Session, body: string) => s.getRepository(Note).insert({ body, block: null });

  describe('"required" (the default)', () => {
    it("joins the scope's session: the same Session object, no new session or connection", async () => {
      const { log } = recordEvents(reg, ["open", "connect"]);
      // holdConnection: one connection for the whole block, so a second one would show.
      await reg.withSession(
        async (outer) => {
          await outer.query("SELECT 1");
          await reg.withSession(async (inner) => {
            expect(inner).to.equal(outer);
            await reg.withTransaction(async (tx) => expect(tx).to.equal(outer));
          });
        },
        { holdConnection: true },
      );
      expect(log).to.have.length(2);
    });

    it("outside any scope opens a new one", async () => {
      const ids = await Promise.all([reg.withSession((s) => s.id), reg.withSession((s) => s.id)]);
      expect(ids[0]).not.to.equal(ids[1]);
    });
  });

  describe('"requiresNew"', () => {
    it("opens a separate session and leaves the outer one as it was", async () => {
      await reg.withSession(async (outer) => {
        await reg.withSession(
          async (inner) => {
            expect(inner).not.to.equal(outer);
            expect(reg.current()).to.equal(inner);
          },
          { propagation: "requiresNew" },
        );
        expect(reg.current()).to.equal(outer);
      });
    });
  });

  describe('"mandatory"', () => {
    it("rejects with NoActiveSessionError outside any scope", async () => {
      const error = await rejectionOf(reg.withSession(async () => 1, { propagation: "mandatory", name: "settle" }));
      expect(error).to.be.instanceOf(NoActiveSessionError);
      expect((error as Error).message).to.match(/"mandatory" \(settle\).*withSession/s);
    });

    it("joins inside a scope", async () => {
      await reg.withSession(async (outer) => {
        expect(await reg.withSession((s) => s, { propagation: "mandatory" })).to.equal(outer);
      });
    });
  });

  describe("savepoint", () => {
    it("default: a nested failing block undoes only its own work", async () => {
      await reg.withTransaction(async (s) => {
        await insert(s, "outer 1");
        const error = await rejectionOf(
          reg.withTransaction(async (inner) => {
            await insert(inner, "inner");
            throw new Boom("inner");
          }),
        );
        expect(error).to.be.instanceOf(Boom);
        await insert(s, "outer 2");
      });
      expect(await bodies()).to.deep.equal(["outer 1", "outer 2"]);
    });

    it("nested savepoints three deep each undo their own work", async () => {
      await reg.withTransaction(async (s) => {
        await insert(s, "a");
        await reg.withTransaction(async () => {
          await insert(s, "b");
          await rejectionOf(
            reg.withTransaction(async () => {
              await insert(s, "c");
              throw new Boom("c");
            }),
          );
          await insert(s, "d");
        });
      });
      expect(await bodies()).to.deep.equal(["a", "b", "d"]);
    });

    it("false: an inner failure the outer body catches rolls the outer back and rejects with PropagationError naming the inner block", async () => {
      const error = await rejectionOf(
        reg.withTransaction(async (s) => {
          await insert(s, "outer");
          await rejectionOf(
            reg.withTransaction(
              async (inner) => {
                await insert(inner, "inner");
                throw new Boom("inner");
              },
              { savepoint: false, name: "chargeCard" },
            ),
          );
          return "the outer body thinks all is well";
        }),
      );
      expect(error).to.be.instanceOf(PropagationError);
      expect((error as Error).message).to.match(/"chargeCard".*savepoint: false/s);
      expect(await bodies()).to.deep.equal([]);
    });

    it("false: an inner failure that propagates rolls everything back with the inner error", async () => {
      const boom = new Boom("inner");
      const error = await rejectionOf(
        reg.withTransaction(async (s) => {
          await insert(s, "outer");
          await reg.withTransaction(
            async () => {
              throw boom;
            },
            { savepoint: false },
          );
        }),
      );
      expect(error).to.equal(boom);
      expect(await bodies()).to.deep.equal([]);
    });

    it("false: a successful inner block simply joins (no SAVEPOINT)", async () => {
      const { log } = recordEvents(reg, ["begin"]);
      await reg.withTransaction(async () => {
        await reg.withTransaction((inner) => insert(inner, "joined"), { savepoint: false });
      });
      expect(log).to.have.length(1);
      expect(await bodies()).to.deep.equal(["joined"]);
    });
  });

  describe("durable", () => {
    it("is fine as the outermost transaction", async () => {
      await reg.withTransaction((s) => insert(s, "durable"), { durable: true });
      expect(await bodies()).to.deep.equal(["durable"]);
    });

    it("rejects with PropagationError inside another transaction", async () => {
      await reg.withTransaction(async () => {
        const error = await rejectionOf(reg.withTransaction(async () => 1, { durable: true, name: "ledger" }));
        expect(error).to.be.instanceOf(PropagationError);
        expect((error as Error).message).to.match(/"ledger" is durable/);
      });
    });
  });

  describe("guarantee 7: options that cannot apply to a joined transaction", () => {
    for (const [option, value] of [
      ["isolation", "SERIALIZABLE"],
      ["readOnly", true],
    ] as const) {
      it(`${option} on a nested block rejects with PropagationError`, async () => {
        await reg.withTransaction(async () => {
          const error = await rejectionOf(reg.withTransaction(async () => 1, { [option]: value }));
          expect(error).to.be.instanceOf(PropagationError);
          expect((error as Error).message).to.include(option === "isolation" ? "isolation SERIALIZABLE" : "readOnly");
        });
      });
    }

    it("isolation applies to an outermost block", async () => {
      await reg.withTransaction((s) => insert(s, "serializable"), { isolation: "SERIALIZABLE" });
      expect(await bodies()).to.deep.equal(["serializable"]);
    });
  });

  describe("readOnly", () => {
    it("refuses writes inside, and the connection is writable again after", async () => {
      const error = await rejectionOf(reg.withTransaction((s) => insert(s, "nope"), { readOnly: true }));
      expect(String(error)).to.match(/readonly|read-only|read only|attempt to write/i);
      expect(
        await reg.withTransaction(async (s) => (await s.getRepository(Note).count(), "reads work"), { readOnly: true }),
      ).to.equal("reads work");
      await reg.withTransaction((s) => insert(s, "writable again"));
      expect(await bodies()).to.deep.equal(["writable again"]);
    });
  });

  describe("sibling blocks of one session", () => {
    it("concurrent transactional blocks joining one scope take turns, each atomic", async () => {
      await reg.withSession(async () => {
        const outcomes = await Promise.allSettled(
          [0, 1, 2, 3].map((i) =>
            reg.withTransaction(async (s) => {
              await insert(s, `sibling ${i} a`);
              await new Promise<void>((r) => setImmediate(r));
              await insert(s, `sibling ${i} b`);
              if (i % 2 === 1) throw new Boom(`sibling ${i}`);
            }),
          ),
        );
        expect(outcomes.map((o) => o.status)).to.deep.equal(["fulfilled", "rejected", "fulfilled", "rejected"]);
      });
      expect(await bodies()).to.deep.equal(["sibling 0 a", "sibling 0 b", "sibling 2 a", "sibling 2 b"]);
    });

    it("concurrent savepoint blocks inside one transaction take turns, each undoing only its own work", async () => {
      await reg.withTransaction(async () => {
        await Promise.allSettled(
          [0, 1, 2, 3].map((i) =>
            reg.withTransaction(async (s) => {
              await insert(s, `sp ${i} a`);
              await new Promise<void>((r) => setImmediate(r));
              await insert(s, `sp ${i} b`);
              if (i % 2 === 1) throw new Boom(`sp ${i}`);
            }),
          ),
        );
      });
      expect(await bodies()).to.deep.equal(["sp 0 a", "sp 0 b", "sp 2 a", "sp 2 b"]);
    });
  });

  describe("ownership: a block's transaction belongs to that block", () => {
    it("a sibling cannot commit it: TransactionNotActiveError, and the owner's rollback still undoes all its work", async () => {
      await reg.withSession(async (s) => {
        const inTx = deferred();
        const release = deferred();
        const owner = reg.withTransaction(async (t) => {
          await insert(t, "A1");
          inTx.resolve();
          await release.promise;
          await insert(t, "A2");
          throw new Boom("owner fails");
        });
        await inTx.promise;
        expect(await rejectionOf(s.commit())).to.be.instanceOf(TransactionNotActiveError);
        release.resolve();
        expect(await rejectionOf(owner)).to.be.instanceOf(Boom);
      });
      expect(await bodies()).to.deep.equal([]);
    });

    it("a sibling's afterCommit does not attach to it: outside any transaction of its own it runs at once", async () => {
      const seen: string[] = [];
      await reg.withSession(async (s) => {
        const inTx = deferred();
        const release = deferred();
        const owner = reg.withTransaction(async () => {
          inTx.resolve();
          await release.promise;
          throw new Boom("owner rolls back");
        });
        await inTx.promise;
        s.afterCommit(() => seen.push("sibling's callback"));
        expect(seen).to.deep.equal(["sibling's callback"]);
        release.resolve();
        await rejectionOf(owner);
      });
      expect(seen).to.deep.equal(["sibling's callback"]);
    });

    it("TypeORM's manager.transaction() calls running concurrently in one scope take turns", async () => {
      await reg.scope(async () => {
        const outcomes = await Promise.allSettled(
          [0, 1, 2].map((i) =>
            reg.manager.transaction(async (m) => {
              await m.insert(Note, { body: `t${i} a`, block: i });
              await new Promise<void>((r) => setImmediate(r));
              await m.insert(Note, { body: `t${i} b`, block: i });
              if (i === 1) throw new Boom("t1");
            }),
          ),
        );
        expect(outcomes.map((o) => o.status)).to.deep.equal(["fulfilled", "rejected", "fulfilled"]);
      });
      expect(await bodies()).to.deep.equal(["t0 a", "t0 b", "t2 a", "t2 b"]);
    });
  });
});
