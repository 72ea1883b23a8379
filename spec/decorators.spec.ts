// Compiled twice: with TypeScript's legacy decorators (tsconfig.json) and with
// standard TC39 decorators (tsconfig.standard.json). The same tests must pass in both.
import "reflect-metadata";
import { expect } from "chai";
import {
  createSessionRegistry,
  currentSession,
  PropagationError,
  type Session,
  Transactional,
  UsesSession,
} from "../src/index.js";
import { recordEvents, rejectionOf } from "./support/util.js";

const reg = createSessionRegistry({ name: "decorators" });

/** Which decorator convention this compilation uses: legacy calls get 3 arguments, standard ones 2. */
const mode = (() => {
  let count = 0;
  const probe = (...args: unknown[]): void => {
    count = args.length;
  };
  class Probe {
    @probe
    method(): void {}
  }
  void Probe;
  return count === 2 ? "standard" : "legacy";
})();

/** A decorator that stores reflect-metadata on the method, as routing or validation decorators do. */
function Meta(key: string, value: string) {
  return (target: unknown, keyOrContext: unknown, descriptor?: PropertyDescriptor): void => {
    const method: unknown = typeof keyOrContext === "object" ? target : descriptor!.value;
    Reflect.defineMetadata(key, value, method as object);
  };
}

class Boom extends Error {}

const rows = () => reg.withSession((s) => s.query<{ body: string }[]>("SELECT body FROM notes ORDER BY id"));

class ImportJob {
  seen: Session[] = [];
  readonly prefix: string;

  constructor(prefix: string) {
    this.prefix = prefix;
  }

  @UsesSession({ registry: reg })
  async run(count: number): Promise<string> {
    const s = currentSession(reg);
    this.seen.push(s);
    for (let i = 0; i < count; i++) await this.store(`${this.prefix}${i}`);
    return `${this.prefix} x${count}`;
  }

  @Transactional({ registry: reg })
  async store(body: string): Promise<void> {
    this.seen.push(currentSession(reg));
    await currentSession(reg).query("INSERT INTO notes (body) VALUES (?)", [body]);
  }

  @Transactional({ registry: reg })
  async storeThenFail(body: string): Promise<void> {
    await this.store(body);
    throw new Boom(`failed after ${body}`);
  }

  @Meta("route", "/reports")
  @UsesSession({ registry: reg })
  @Meta("validation", "strict")
  async report(): Promise<number> {
    return (await currentSession(reg).query<{ n: number }[]>("SELECT count(*) AS n FROM notes"))[0]!.n;
  }

  @UsesSession({ registry: reg })
  static async total(): Promise<number> {
    return (await currentSession(reg).query<{ n: number }[]>("SELECT count(*) AS n FROM notes"))[0]!.n;
  }
}

class PriorityImportJob extends ImportJob {
  @UsesSession({ registry: reg })
  override async run(count: number): Promise<string> {
    const outer = currentSession(reg);
    const result = await super.run(count + 1);
    expect(currentSession(reg)).to.equal(outer);
    return `priority ${result}`;
  }
}

describe(`decorators (${mode} decorators)`, () => {
  beforeEach(async () => {
    reg.configure({ url: "sqlite::memory:" });
    await reg.withSession((s) => s.query("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"));
  });
  afterEach(() => reg.dataSource?.destroy());

  it("runs each call in a session that nested decorated calls join, and removes it after", async () => {
    const { log } = recordEvents(reg, ["open", "close"]);
    const job = new ImportJob("n");
    expect(await job.run(3)).to.equal("n x3");
    expect(new Set(job.seen).size).to.equal(1);
    expect(job.seen[0]!.closed).to.equal(true);
    expect(log).to.deep.equal([`open#${job.seen[0]!.id}`, `close#${job.seen[0]!.id}`]);
    expect((await rows()).map((r) => r.body)).to.deep.equal(["n0", "n1", "n2"]);
  });

  it("@Transactional commits on resolve and rolls back on throw, rethrowing the method's error", async () => {
    const job = new ImportJob("t");
    const error = await rejectionOf(job.storeThenFail("doomed"));
    expect(error).to.be.instanceOf(Boom);
    expect((error as Error).message).to.equal("failed after doomed");
    await job.store("kept");
    expect((await rows()).map((r) => r.body)).to.deep.equal(["kept"]);
  });

  it("a @Transactional call nested in one is a savepoint", async () => {
    const job = new ImportJob("s");
    await reg.withTransaction(async () => {
      await job.store("outer");
      await rejectionOf(job.storeThenFail("inner"));
    });
    expect((await rows()).map((r) => r.body)).to.deep.equal(["outer"]);
  });

  it("keeps this, arguments, return value, name and length", () => {
    expect(ImportJob.prototype.run.name).to.equal("run");
    expect(ImportJob.prototype.run.length).to.equal(1);
    expect(ImportJob.prototype.store.name).to.equal("store");
    expect(ImportJob.total.name).to.equal("total");
  });

  it("keeps reflect-metadata stored by decorators below and above it", () => {
    // The one above stored its metadata on the wrapper itself.
    expect(Reflect.getOwnMetadata("route", ImportJob.prototype.report)).to.equal("/reports");
    // The one below stored its metadata on the original method; the wrapper carries it too.
    expect(Reflect.getOwnMetadata("validation", ImportJob.prototype.report)).to.equal("strict");
  });

  it("works on static methods", async () => {
    await new ImportJob("x").store("one");
    expect(await ImportJob.total()).to.equal(1);
  });

  it("names sessions Class.method, the declaring class, also when called through a subclass", async () => {
    const names: (string | undefined)[] = [];
    reg.on("open", (e) => names.push(e.name));
    await new ImportJob("a").run(0);
    await ImportJob.total();
    await new PriorityImportJob("p").store("via subclass");
    expect(names).to.deep.equal(["ImportJob.run", "ImportJob.total", "ImportJob.store"]);
  });

  it("a subclass overriding a decorated method: super call joins the subclass call's session", async () => {
    const job = new PriorityImportJob("p");
    const names: (string | undefined)[] = [];
    reg.on("open", (e) => names.push(e.name));
    expect(await job.run(1)).to.equal("priority p x2");
    expect(names).to.deep.equal(["PriorityImportJob.run"]);
    expect(new Set(job.seen).size).to.equal(1);
  });

  it("an explicit name option wins", async () => {
    class Named {
      @UsesSession({ registry: reg, name: "nightly" })
      async run(): Promise<string | undefined> {
        return currentSession(reg).name;
      }
    }
    expect(await new Named().run()).to.equal("nightly");
  });

  it("takes the same options as the blocks, with the same guarantees", async () => {
    class Strict {
      @Transactional({ registry: reg, durable: true })
      async ledger(): Promise<void> {}
    }
    await new Strict().ledger();
    await reg.withTransaction(async () => {
      expect(await rejectionOf(new Strict().ledger())).to.be.instanceOf(PropagationError);
    });
  });

  it("a class-level @UsesSession() wraps each own async method once, and leaves sync ones alone", async () => {
    @UsesSession({ registry: reg })
    class Worker {
      async first(): Promise<Session> {
        return currentSession(reg);
      }

      @Transactional({ registry: reg })
      async second(): Promise<boolean> {
        return currentSession(reg).inTransaction;
      }

      sync(): string {
        return "not wrapped";
      }

      static async stat(): Promise<Session> {
        return currentSession(reg);
      }
    }
    const worker = new Worker();
    expect((await worker.first()).closed).to.equal(true);
    expect(await worker.second()).to.equal(true);
    expect(worker.sync()).to.equal("not wrapped");
    expect((await Worker.stat()).name).to.equal("Worker.stat");
  });

  it("rejects what is not a method, when the class is defined", () => {
    expect(() => {
      class Field {
        // @ts-expect-error: a field is not a method
        @UsesSession()
        value = 1;
      }
      return new Field();
    }).to.throw(TypeError, /decorates methods and classes, but was applied to .*field.*value/);
    expect(() => {
      class Accessor {
        // @ts-expect-error: an accessor is not a method
        @Transactional()
        get value(): number {
          return 1;
        }
      }
      return Accessor;
    }).to.throw(TypeError, /@Transactional\(\) decorates methods and classes, but was applied to .*value/);
  });

  it("rejects invalid options when the class is defined", () => {
    expect(() => UsesSession({ propagation: "nested" as never })).to.throw(RangeError, /`propagation`/);
    expect(() => Transactional({ bogus: 1 } as never)).to.throw(TypeError, /Unknown session option `bogus`/);
  });
});
