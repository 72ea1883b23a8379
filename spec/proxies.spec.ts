import "reflect-metadata";
import { Controller, Get, Inject, Injectable, Module } from "@nestjs/common";
import { NestFactory } from "@nestjs/core";
import { expect } from "chai";
import { inspect } from "node:util";
import { Column, Entity, EntityManager, PrimaryGeneratedColumn, Repository } from "typeorm";
import { createSessionRegistry, NoActiveSessionError, type SessionRegistry } from "../src/index.js";
import { sessionMiddleware } from "../src/integrations/express.js";
import { forEachBackend, type TestDb } from "./support/backends.js";
import { Note } from "./support/entities.js";
import { ENTITIES, TempSqlite } from "./support/sqlite.js";
import { rejectionOf } from "./support/util.js";

/** What frameworks and runtimes read on objects they are handed. */
const PROBES = [
  "then",
  "onModuleInit",
  "onApplicationBootstrap",
  "onModuleDestroy",
  "beforeApplicationShutdown",
  "onApplicationShutdown",
  "toJSON",
  "inspect",
  "somethingUnknown",
] as const;

/** Read `property` of `value`; the read itself must not throw. */
function read(value: object, property: PropertyKey): unknown {
  return (value as Record<PropertyKey, unknown>)[property];
}

forEachBackend("scoped proxies", (backend) => {
  let db: TestDb;
  let reg: SessionRegistry;
  beforeEach(async () => {
    db = await backend.open();
    reg = db.registry("proxies");
  });
  afterEach(() => db.dispose());

  describe("reading a property outside a scope never throws", () => {
    it("probes give what a plain object gives, before and after initialization", async () => {
      const notes = reg.getRepository(Note);
      const manager = reg.manager;
      for (const stage of ["before", "after"]) {
        if (stage === "after") await reg.ready();
        for (const proxy of [notes, manager]) {
          for (const property of PROBES) expect(read(proxy, property), `${stage}: ${property}`).to.equal(undefined);
          for (const symbol of [Symbol.toStringTag, inspect.custom, Symbol.iterator, Symbol("x")]) {
            expect(read(proxy, symbol), `${stage}: ${String(symbol)}`).to.equal(undefined);
          }
          expect(Object.prototype.toString.call(proxy)).to.equal("[object Object]");
          // eslint-disable-next-line @typescript-eslint/no-base-to-string -- what String() gives is the point
          expect(String(proxy)).to.equal("[object Object]");
          expect(JSON.stringify(proxy)).to.equal("{}");
          expect(() => inspect(proxy)).not.to.throw();
        }
        expect(notes.constructor).to.equal(Repository);
        expect(notes).to.be.instanceOf(Repository);
        expect(manager.constructor).to.equal(EntityManager);
        expect(manager).to.be.instanceOf(EntityManager);
      }
    });

    it("await and promise resolution treat the proxies as plain values", async () => {
      const notes = reg.getRepository(Note);
      // eslint-disable-next-line @typescript-eslint/await-thenable -- awaiting a non-thenable is the point
      expect(await notes).to.equal(notes);
      expect(await Promise.resolve(reg.manager)).to.equal(reg.manager);
      expect(await (async () => notes)()).to.equal(notes);
    });

    it("target, metadata and the manager's connection need no session", async () => {
      const notes = reg.getRepository(Note);
      expect(notes.target).to.equal(Note);
      // TypeORM builds metadata when the DataSource initializes: until then there is none.
      expect(notes.metadata).to.equal(undefined);
      expect(reg.manager.connection).to.equal(reg._knownDataSource());
      await reg.ready();
      expect(notes.metadata.tableName).to.equal("notes");
      expect(notes.metadata).to.equal(reg.dataSource!.getMetadata(Note));
      expect(reg.manager.connection).to.equal(reg.dataSource);
    });

    it("methods still refuse outside a scope: async ones reject, sync ones throw", async () => {
      const notes = reg.getRepository(Note);
      expect(await rejectionOf(notes.findOneBy({ id: 1 }))).to.be.instanceOf(NoActiveSessionError);
      expect(await rejectionOf(reg.manager.count(Note))).to.be.instanceOf(NoActiveSessionError);
      expect(() => notes.create({ body: "x" })).to.throw(NoActiveSessionError);
      expect(() => notes.createQueryBuilder("n")).to.throw(NoActiveSessionError);
      expect(() => reg.manager.merge(Note, new Note(), {})).to.throw(NoActiveSessionError);
    });
  });

  describe("inside a scope", () => {
    it("members and methods go to the caller's session", async () => {
      const notes = reg.getRepository(Note);
      await reg.withTransaction(async (s) => {
        expect(notes.manager).to.equal(s.manager);
        expect(notes.queryRunner).to.equal(s.getRepository(Note).queryRunner);
        expect(reg.manager.queryRunner).to.equal(s.manager.queryRunner);
        await notes.insert({ body: "proxied", block: 1 });
        expect(await s.getRepository(Note).countBy({ block: 1 })).to.equal(1);
        for (const property of PROBES) expect(read(notes, property), property).to.equal(undefined);
      });
    });
  });

  describe("extend(): custom repositories", () => {
    it("at import time (no scope, DataSource not initialized) gives a scoped custom repository", async () => {
      const calls: unknown[] = [];
      // The TypeORM 0.3 custom repository pattern, made before anything is initialized.
      const NoteRepository = reg.getRepository(Note).extend({
        findByBody(body: string) {
          calls.push(this);
          return this.findOneBy({ body });
        },
        async countBlock(block: number) {
          return this.countBy({ block });
        },
        label: "notes",
      });
      expect(reg.dataSource).to.equal(undefined);
      expect(NoteRepository.target).to.equal(Note);
      expect(NoteRepository.label).to.equal("notes");
      for (const property of PROBES) expect(read(NoteRepository, property), property).to.equal(undefined);
      expect(await rejectionOf(NoteRepository.countBlock(1))).to.be.instanceOf(NoActiveSessionError);
      expect(() => NoteRepository.findByBody("x")).to.throw(NoActiveSessionError);

      await reg
        .withTransaction(async (s) => {
          await NoteRepository.insert({ body: "mine", block: 7 }); // inherited, on the session
          const found = await NoteRepository.findByBody("mine"); // custom, `this` on the session
          expect(found?.block).to.equal(7);
          expect(await NoteRepository.countBlock(7)).to.equal(1);
          const self = calls[0] as Repository<Note>;
          expect(self.manager).to.equal(s.manager);
          expect(self.queryRunner).to.equal(s.queryRunner);
          // Another block sees nothing of the uncommitted row through the same custom repository.
          if (backend.kind === "postgres") {
            expect(
              await reg.withSession(() => NoteRepository.findByBody("mine"), { propagation: "requiresNew" }),
            ).to.equal(null);
          }
          throw new Error("roll back");
        })
        .catch((error: unknown) => {
          if ((error as Error).message !== "roll back") throw error;
        });
      expect(await reg.withSession(() => NoteRepository.countBlock(7))).to.equal(0);
    });

    it("chains: extend() of a custom repository keeps both sets of methods", async () => {
      const base = reg.getRepository(Note).extend({
        byBlock(block: number) {
          return this.findBy({ block });
        },
      });
      const more = base.extend({
        async firstOfBlock(block: number) {
          return (await this.byBlock(block))[0] ?? null;
        },
      });
      await reg.withTransaction(async () => {
        await more.insert([
          { body: "a", block: 3 },
          { body: "b", block: 3 },
        ]);
        expect(await more.byBlock(3)).to.have.length(2);
        expect((await more.firstOfBlock(3))?.block).to.equal(3);
      });
    });
  });
});

@Entity("cats")
class Cat {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  name!: string;
}

describe("scoped proxies in a real NestJS application", () => {
  let sqlite: TempSqlite;
  afterEach(() => sqlite.dispose());

  it("a factory provider returning a repository proxy bootstraps, serves a request and closes", async () => {
    sqlite = new TempSqlite();
    const db = createSessionRegistry({
      name: "nest",
      dataSource: sqlite.dataSource({ entities: [...ENTITIES, Cat] }),
    });
    const NamedCats = db.getRepository(Cat).extend({
      named(name: string) {
        return this.findOneBy({ name });
      },
    });

    @Injectable()
    class CatsService {
      readonly cats: Repository<Cat>;
      readonly named: typeof NamedCats;
      constructor(@Inject("CATS") cats: Repository<Cat>, @Inject("NAMED_CATS") named: typeof NamedCats) {
        this.cats = cats;
        this.named = named;
      }
      async list(): Promise<{ names: string[]; tom: number | undefined; runner: boolean }> {
        await this.cats.insert([{ name: "Tom" }, { name: "Felix" }]);
        const all = await this.cats.find({ order: { id: "ASC" } });
        const tom = await this.named.named("Tom");
        return {
          names: all.map((c) => c.name),
          tom: tom?.id,
          runner: this.cats.queryRunner === db.current().queryRunner,
        };
      }
    }

    @Controller("cats")
    class CatsController {
      readonly service: CatsService;
      constructor(@Inject(CatsService) service: CatsService) {
        this.service = service;
      }
      @Get()
      list(): Promise<unknown> {
        return this.service.list();
      }
    }

    @Module({
      controllers: [CatsController],
      providers: [
        CatsService,
        { provide: "CATS", useFactory: () => db.getRepository(Cat) },
        { provide: "NAMED_CATS", useFactory: () => NamedCats },
        { provide: "MANAGER", useFactory: () => db.manager },
      ],
    })
    class CatsModule {}

    const app = await NestFactory.create(CatsModule, { logger: false });
    app.use(sessionMiddleware({ registry: db }));
    await app.init();
    await app.listen(0, "127.0.0.1");
    try {
      const response = await fetch(`${await app.getUrl()}/cats`.replace("[::1]", "127.0.0.1"));
      expect(response.status).to.equal(200);
      expect(await response.json()).to.deep.equal({ names: ["Tom", "Felix"], tom: 1, runner: true });
      expect(db.stats()).to.include({ opened: 1, closed: 1, active: 0 });
    } finally {
      await app.close();
    }
  });
});
