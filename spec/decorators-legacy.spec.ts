// Parameter decorators exist only with TypeScript's legacy decorators: @InjectSession().
import "reflect-metadata";
import { expect } from "chai";
import {
  createSessionRegistry,
  currentSession,
  InjectSession,
  type Session,
  Transactional,
  UsesSession,
} from "../src/index.js";
import { deferred } from "./support/util.js";

const reg = createSessionRegistry({ name: "inject" });

class Reports {
  @UsesSession({ registry: reg })
  async count(table: string, @InjectSession() s?: Session): Promise<{ s: Session; current: Session; n: number }> {
    const rows = await s!.query<{ n: number }[]>(`SELECT count(*) AS n FROM ${table}`);
    return { s: s!, current: currentSession(reg), n: rows[0]!.n };
  }

  @Transactional({ registry: reg })
  async add(@InjectSession() s?: Session, body = "x"): Promise<boolean> {
    await s!.query("INSERT INTO notes (body) VALUES (?)", [body]);
    return s!.inTransaction;
  }
}

@UsesSession({ registry: reg })
class ClassLevel {
  async who(@InjectSession() s?: Session): Promise<Session | undefined> {
    return s;
  }
}

describe("@InjectSession() (legacy decorators)", () => {
  beforeEach(async () => {
    reg.configure({ url: "sqlite::memory:" });
    await reg.withSession((s) => s.query("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"));
  });
  afterEach(() => reg.dataSource?.destroy());

  it("fills the parameter with the method's session when the caller passes undefined", async () => {
    const result = await new Reports().count("notes");
    expect(result.s).to.equal(result.current);
    expect(result.n).to.equal(0);
    expect(await new Reports().add()).to.equal(true);
    expect((await new Reports().count("notes")).n).to.equal(1);
  });

  it("a session the caller passes explicitly wins", async () => {
    await reg.withSession(async (mine) => {
      const gotOther = deferred<Session>();
      const release = deferred();
      const otherBlock = reg.withSession(
        async (other) => {
          gotOther.resolve(other);
          await release.promise;
        },
        { propagation: "requiresNew" },
      );
      const other = await gotOther.promise;
      const result = await new Reports().count("notes", other);
      expect(result.s).to.equal(other);
      expect(result.current).to.equal(mine); // the method's own block joined the caller's scope
      release.resolve();
      await otherBlock;
    });
  });

  it("works under a class-level @UsesSession()", async () => {
    const s = await new ClassLevel().who();
    expect(s?.closed).to.equal(true);
  });

  it("rejects use on something that is not a method parameter", () => {
    expect(() => (InjectSession() as (...args: unknown[]) => void)(class {}, undefined, 0)).to.throw(
      TypeError,
      /decorates a method parameter/,
    );
  });
});
