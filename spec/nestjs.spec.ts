import "reflect-metadata";
import type { ClientRequest, Server } from "node:http";
import type { AddressInfo } from "node:net";
import {
  Body,
  type CanActivate,
  Controller,
  type DynamicModule,
  type ExecutionContext,
  Get,
  HttpException,
  Inject,
  Injectable,
  type INestApplication,
  Module,
  Post,
  Req,
  UseGuards,
} from "@nestjs/common";
import { NestFactory } from "@nestjs/core";
import { FastifyAdapter } from "@nestjs/platform-fastify";
import { InjectRepository, TypeOrmModule } from "@nestjs/typeorm";
import { expect } from "chai";
import { Column, DataSource, type DataSourceOptions, Entity, PrimaryGeneratedColumn, Repository } from "typeorm";
import {
  currentSession,
  defaultRegistry,
  RegistryClosedError,
  SessionRegistry,
  Transactional,
  withSession,
} from "../src/index.js";
import { InjectSessionRepository, SessionModule } from "../src/integrations/nestjs.js";
import { type Backend, forEachBackend, type TestDb } from "./support/backends.js";
import { TempSqlite } from "./support/sqlite.js";
import { idle, send, within } from "./support/http.js";
import { deferred, rejectionOf } from "./support/util.js";

@Entity("cats")
class Cat {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  name!: string;
}

/** Lets a test hold a request inside its transaction: `entered` once the row is saved, then waits for `release`. */
let gate = { entered: deferred<number>(), release: deferred() };

/** A repository made by a plain factory provider: the registry's proxy, created at start-up. */
const CAT_PROXY = "CAT_PROXY";

@Injectable()
class CatsService {
  readonly cats: Repository<Cat>;
  readonly plainCats: Repository<Cat>;

  constructor(@InjectSessionRepository(Cat) cats: Repository<Cat>, @InjectRepository(Cat) plainCats: Repository<Cat>) {
    this.cats = cats;
    this.plainCats = plainCats;
  }

  @Transactional()
  async adopt(name: string): Promise<{ id: number; session: number }> {
    const cat = await this.cats.save({ name });
    return { id: cat.id, session: currentSession().id };
  }

  @Transactional()
  async adoptThenFail(name: string): Promise<never> {
    await this.cats.save({ name });
    throw new HttpException("no room for another cat", 409);
  }

  @Transactional()
  async adoptSlowly(name: string): Promise<void> {
    await this.cats.save({ name });
    gate.entered.resolve(currentSession().id);
    await gate.release.promise;
  }

  /** The mistake the warning is about: a repository bound to dataSource.manager inside a transaction. */
  @Transactional()
  async adoptOutside(name: string): Promise<void> {
    await this.cats.save({ name: `${name} (inside)` });
    await this.plainCats.save({ name });
  }
}

/** Guards run inside the request's scope: this one creates the session the handler then uses. */
@Injectable()
class SessionGuard implements CanActivate {
  canActivate(context: ExecutionContext): boolean {
    context.switchToHttp().getRequest<{ guardSession?: number }>().guardSession = currentSession().id;
    return true;
  }
}

@Controller("cats")
class CatsController {
  readonly #service: CatsService;
  readonly #proxy: Repository<Cat>;

  constructor(service: CatsService, @Inject(CAT_PROXY) proxy: Repository<Cat>) {
    this.#service = service;
    this.#proxy = proxy;
  }

  @Get("session")
  @UseGuards(SessionGuard)
  async session(@Req() req: { guardSession?: number }): Promise<{ session: number; guard?: number; count: number }> {
    const session = currentSession().id;
    await new Promise((resolve) => setTimeout(resolve, 5));
    return { session, guard: req.guardSession, count: await this.#proxy.count() };
  }

  @Post()
  adopt(@Body() body: { name: string }): Promise<{ id: number; session: number }> {
    return this.#service.adopt(body.name);
  }

  @Post("fail")
  fail(@Body() body: { name: string }): Promise<never> {
    return this.#service.adoptThenFail(body.name);
  }

  @Post("slow")
  async slow(@Body() body: { name: string }): Promise<{ ok: true }> {
    await this.#service.adoptSlowly(body.name);
    return { ok: true };
  }

  @Post("outside")
  async outside(@Body() body: { name: string }): Promise<{ ok: true }> {
    await this.#service.adoptOutside(body.name);
    return { ok: true };
  }
}

@Module({
  imports: [SessionModule.forFeature([Cat]), TypeOrmModule.forFeature([Cat])],
  controllers: [CatsController],
  providers: [CatsService, { provide: CAT_PROXY, useFactory: () => defaultRegistry.getRepository(Cat) }],
})
class CatsModule {}

function appModule(options: DataSourceOptions): new () => unknown {
  @Module({
    imports: [
      TypeOrmModule.forRoot({ ...options, entities: [Cat], synchronize: true }),
      SessionModule.forRootAsync({ useFactory: (ds: DataSource) => ({ dataSource: ds }), inject: [DataSource] }),
      CatsModule,
    ],
  })
  class AppModule {}
  return AppModule;
}

const platforms = {
  express: () => undefined,
  fastify: () => new FastifyAdapter(),
} as const;

let names = 0;

/** The TSS_OUTSIDE_TRANSACTION warnings emitted while `fn` runs (they are emitted on the next tick). */
async function warningsDuring(fn: () => Promise<void>): Promise<Error[]> {
  const warnings: Error[] = [];
  const listener = (warning: Error): void => {
    if ((warning as Error & { code?: string }).code === "TSS_OUTSIDE_TRANSACTION") warnings.push(warning);
  };
  process.on("warning", listener);
  try {
    await fn();
    await new Promise<void>((resolve) => setImmediate(resolve));
  } finally {
    process.off("warning", listener);
  }
  return warnings;
}

for (const [platform, adapter] of Object.entries(platforms)) {
  forEachBackend(`nestjs: SessionModule on ${platform}`, (backend: Backend) => {
    let db: TestDb;
    let app: INestApplication | undefined;
    let port: number;
    let name: string;
    beforeEach(async () => {
      db = await backend.open();
      name = `cat ${++names}`;
      const module = appModule(db.dataSource().options);
      const platformAdapter = adapter();
      app =
        platformAdapter === undefined
          ? await NestFactory.create(module, { logger: false, abortOnError: false })
          : await NestFactory.create(module, platformAdapter, { logger: false, abortOnError: false });
      await app.listen(0, "127.0.0.1");
      port = ((app.getHttpServer() as Server).address() as AddressInfo).port;
    });
    afterEach(async () => {
      await app?.close();
      app = undefined;
      await db.dispose();
    });

    /** How many cats with this name, read on a connection of its own. */
    const count = async (catName: string): Promise<number> => {
      const fresh = db.dataSource({ entities: [Cat] });
      await fresh.initialize();
      try {
        return await fresh.getRepository(Cat).countBy({ name: catName });
      } finally {
        await fresh.destroy();
      }
    };

    it("makes the registry injectable and gives each request its own session in the controller", async () => {
      expect(app!.get(SessionRegistry)).to.equal(defaultRegistry);
      const replies = await Promise.all([send(port, "/cats/session"), send(port, "/cats/session")]);
      const bodies = replies.map((r) => JSON.parse(r.body) as { session: number; guard: number; count: number });
      expect(replies.map((r) => r.status)).to.deep.equal([200, 200]);
      expect(bodies[0]!.session).to.be.a("number").and.not.equal(bodies[1]!.session);
      for (const body of bodies) expect(body.guard).to.equal(body.session);
      await idle(defaultRegistry);
    });

    it("a @Transactional service on an InjectSessionRepository repository commits a POST", async () => {
      const reply = await send(port, "/cats", { method: "POST", json: { name } });
      expect(reply.status).to.equal(201);
      await idle(defaultRegistry);
      expect(await count(name)).to.equal(1);
    });

    it("a method that saves then throws is rolled back: the row is absent from a fresh connection", async () => {
      const reply = await send(port, "/cats/fail", { method: "POST", json: { name } });
      expect(reply.status).to.equal(409);
      expect(JSON.parse(reply.body)).to.include({ message: "no room for another cat" });
      await idle(defaultRegistry);
      expect(await count(name)).to.equal(0);
      expect(defaultRegistry.stats().active).to.equal(0);
    });

    it("warns, once per call site, when an @InjectRepository repository runs inside a @Transactional method", async () => {
      const warnings = await warningsDuring(async () => {
        for (let i = 0; i < 2; i++) {
          expect((await send(port, "/cats/outside", { method: "POST", json: { name } })).status).to.equal(201);
        }
      });
      expect(warnings).to.have.length(1);
      expect(warnings[0]!.message).to.include("outside the transaction");
      expect(warnings[0]!.message).to.include("InjectSessionRepository");
      expect(warnings[0]!.message).to.match(/ at CatsService\.adoptOutside \(.*nestjs\.spec\.js:\d+:\d+\)/);
      expect(await count(`${name} (inside)`)).to.equal(2);
    });

    it("does not warn about the session's own statements and repositories", async () => {
      const warnings = await warningsDuring(async () => {
        expect((await send(port, "/cats", { method: "POST", json: { name } })).status).to.equal(201);
        expect((await send(port, "/cats/fail", { method: "POST", json: { name } })).status).to.equal(409);
        expect((await send(port, "/cats/session")).status).to.equal(200);
      });
      expect(warnings).to.deep.equal([]);
    });

    it("a client that goes away mid-request crashes nothing; the method ends as its body says and nothing leaks", async () => {
      gate = { entered: deferred<number>(), release: deferred() };
      const closed = deferred<number>();
      const onClose = ({ session }: { session: { id: number } }): void => closed.resolve(session.id);
      let client: ClientRequest | undefined;
      const reply = send(port, "/cats/slow", { method: "POST", json: { name }, sent: (r) => (client = r) }).catch(
        (e: unknown) => e,
      );
      const session = await within(gate.entered.promise, "the method to save its row");
      client!.destroy();
      expect(await reply).to.be.an("error"); // socket hang up
      defaultRegistry.on("close", onClose);
      gate.release.resolve();
      try {
        expect(await within(closed.promise, "the request's session to close")).to.equal(session);
      } finally {
        defaultRegistry.off("close", onClose);
      }
      await idle(defaultRegistry);
      expect(await count(name)).to.equal(1); // the method's body completed: it committed
      expect(defaultRegistry.stats().active).to.equal(0);
    });

    it("drains the registry when the application closes", async () => {
      await send(port, "/cats", { method: "POST", json: { name } });
      await app!.close();
      app = undefined;
      expect(await rejectionOf(withSession(() => 1))).to.be.instanceOf(RegistryClosedError);
      expect(defaultRegistry.stats().active).to.equal(0);
    });
  });
}

describe("nestjs: SessionModule options", () => {
  let db: TestDb;
  let app: INestApplication | undefined;
  beforeEach(async () => {
    db = new TempSqlite();
  });
  afterEach(async () => {
    await app?.close();
    app = undefined;
    await db.dispose();
  });

  @Controller("who")
  class WhoController {
    readonly #registry: SessionRegistry;
    constructor(registry: SessionRegistry) {
      this.#registry = registry;
    }

    @Get()
    async who(): Promise<{ session: number; one: number }> {
      const s = this.#registry.current();
      const [row] = await s.query<{ one: number }[]>("SELECT 1 AS one");
      return { session: s.id, one: Number(row!.one) };
    }
  }

  const start = async (imports: DynamicModule[], platform: "express" | "fastify" = "express", prefix?: string) => {
    @Module({ imports, controllers: [WhoController] })
    class AppModule {}
    app =
      platform === "express"
        ? await NestFactory.create(AppModule, { logger: false, abortOnError: false })
        : await NestFactory.create(AppModule, new FastifyAdapter(), { logger: false, abortOnError: false });
    if (prefix !== undefined) app.setGlobalPrefix(prefix);
    await app.listen(0, "127.0.0.1");
    return ((app.getHttpServer() as Server).address() as AddressInfo).port;
  };

  for (const platform of ["express", "fastify"] as const) {
    it(`forRoot({ registry }) on ${platform}: that registry is injected, scopes requests, and is drained but its DataSource kept`, async () => {
      const reg = db.registry("nest");
      const port = await start([SessionModule.forRoot({ registry: reg })], platform);
      expect(app!.get(SessionRegistry)).to.equal(reg);
      const replies = await Promise.all([send(port, "/who"), send(port, "/who")]);
      const sessions = replies.map((r) => (JSON.parse(r.body) as { session: number }).session);
      expect(new Set(sessions).size).to.equal(2);
      await idle(reg);
      expect(reg.stats()).to.include({ opened: 2, closed: 2, active: 0 });
      const dataSource = reg.dataSource!;
      await app!.close();
      app = undefined;
      expect(await rejectionOf(reg.withSession(() => 1))).to.be.instanceOf(RegistryClosedError);
      expect(dataSource.isInitialized).to.equal(true); // the application's own: it destroys it
    });
  }

  for (const platform of ["express", "fastify"] as const) {
    it(`covers the routes under a global prefix on ${platform}`, async () => {
      const reg = db.registry("prefixed");
      const port = await start([SessionModule.forRoot({ registry: reg })], platform, "api");
      const reply = await send(port, "/api/who");
      expect(reply.status).to.equal(200);
      expect(JSON.parse(reply.body)).to.include({ one: 1 });
      await idle(reg);
    });
  }

  it("forRoot({ url, ... }) configures defaultRegistry, initializes it at start-up and destroys its DataSource on close", async () => {
    const path = (db as unknown as { path: string }).path;
    await start([SessionModule.forRoot({ url: `sqlite:${path}`, entities: [Cat], synchronize: true })]);
    expect(app!.get(SessionRegistry)).to.equal(defaultRegistry);
    const dataSource = defaultRegistry.dataSource!;
    expect(dataSource.isInitialized).to.equal(true);
    await defaultRegistry.withTransaction((s) => s.getRepository(Cat).save({ name: "configured" }));
    await app!.close();
    app = undefined;
    expect(dataSource.isInitialized).to.equal(false);
  });

  it("@Transactional providers work outside requests too: a method called at start-up opens its own session", async () => {
    @Injectable()
    class Seeder {
      @Transactional()
      async seed(): Promise<number> {
        const s = currentSession();
        await s.getRepository(Cat).save({ name: "seeded" });
        return s.id;
      }
    }
    @Module({
      imports: [
        TypeOrmModule.forRoot({ ...db.dataSource().options, entities: [Cat], synchronize: true }),
        SessionModule.forRootAsync({ useFactory: (ds: DataSource) => ({ dataSource: ds }), inject: [DataSource] }),
      ],
      providers: [Seeder],
    })
    class SeedModule {}
    const context = await NestFactory.createApplicationContext(SeedModule, { logger: false, abortOnError: false });
    try {
      expect(await context.get(Seeder).seed()).to.be.a("number");
      expect(defaultRegistry.stats().active).to.equal(0);
      expect(await defaultRegistry.withSession((s) => s.getRepository(Cat).countBy({ name: "seeded" }))).to.equal(1);
    } finally {
      await context.close();
    }
  });

  it("rejects invalid options: at start-up for forRoot, at once for forRootAsync and forFeature", async () => {
    const error = await rejectionOf(start([SessionModule.forRoot({ registry: {} as SessionRegistry })]));
    expect(error).to.be.instanceOf(TypeError);
    expect((error as Error).message).to.match(/`registry` to be a SessionRegistry/);
    app = undefined;
    expect(() => SessionModule.forRootAsync({} as never)).to.throw(TypeError, /useFactory/);
    expect(() => SessionModule.forFeature(Cat as never)).to.throw(TypeError, /array of entities/);
  });
});
