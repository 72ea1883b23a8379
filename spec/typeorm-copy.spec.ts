import { expect } from "chai";
import { cpSync, mkdirSync, mkdtempSync, readdirSync, realpathSync, rmSync, symlinkSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type * as TypeORM from "typeorm";
import { createSessionRegistry, type SessionRegistry } from "../src/index.js";
import { SQLITE_DRIVER } from "./support/sqlite.js";
import { rejectionOf } from "./support/util.js";

/**
 * A second copy of typeorm, as npm link, monorepos and pnpm install it: the package copied
 * to `<tmp>/node_modules/typeorm`, its dependencies (and the drivers) linked beside it from
 * this repository's node_modules, loaded with its own `require`.
 */
function secondCopy(): { dir: string; typeorm: typeof TypeORM } {
  const dir = realpathSync(mkdtempSync(join(tmpdir(), "tss-typeorm-copy-")));
  const modules = join(dir, "node_modules");
  mkdirSync(modules);
  const ours = join(process.cwd(), "node_modules");
  cpSync(join(ours, "typeorm"), join(modules, "typeorm"), { recursive: true });
  for (const name of readdirSync(ours)) {
    if (name !== "typeorm" && name !== ".bin" && !name.startsWith("."))
      symlinkSync(join(ours, name), join(modules, name));
  }
  const typeorm = createRequire(join(dir, "index.js"))("typeorm") as typeof TypeORM;
  return { dir, typeorm };
}

describe("a DataSource from another copy of typeorm", () => {
  let copy: ReturnType<typeof secondCopy>;
  let reg: SessionRegistry | undefined;
  before(function () {
    this.timeout(120_000);
    copy = secondCopy();
  });
  after(() => rmSync(copy.dir, { recursive: true, force: true }));
  afterEach(async () => {
    await reg?.drain({ destroy: true });
    reg = undefined;
  });

  /** An entity of the second copy, and a DataSource of it (SQLite in memory). */
  function pets(): { ds: TypeORM.DataSource; Pet: TypeORM.EntitySchema<{ id: number; name: string }> } {
    const { DataSource, EntitySchema } = copy.typeorm;
    const Pet = new EntitySchema<{ id: number; name: string }>({
      name: "Pet",
      tableName: "pets",
      columns: { id: { type: Number, primary: true, generated: true }, name: { type: String } },
    });
    // `as never`: TypeORM 0.3 has the "sqlite" type, 1.x only "better-sqlite3".
    const ds = new DataSource({
      type: SQLITE_DRIVER,
      database: ":memory:",
      entities: [Pet],
      synchronize: true,
    } as never);
    return { ds, Pet };
  }

  it("is a second copy indeed: its classes are not the library's", async () => {
    const ours = await import("typeorm");
    expect(copy.typeorm.DataSource).not.to.equal(ours.DataSource);
    expect(pets().ds).not.to.be.instanceOf(ours.DataSource);
  });

  it("works end to end: blocks, proxies, extend(), a transaction that rolls back", async () => {
    const { ds, Pet } = pets();
    reg = createSessionRegistry({ name: "copy", dataSource: ds });
    const repo = reg.getRepository(Pet);
    const Named = repo.extend({
      named(name: string) {
        return this.findOneBy({ name });
      },
    });
    expect(repo).to.be.instanceOf(copy.typeorm.Repository);
    expect(reg.manager).to.be.instanceOf(copy.typeorm.EntityManager);
    await reg.ready();
    expect(repo.metadata.tableName).to.equal("pets");
    await reg.withTransaction(async (s) => {
      expect(s.manager).to.be.instanceOf(copy.typeorm.EntityManager);
      await repo.insert({ name: "Rex" });
    });
    const failure = new Error("roll back");
    const error = await rejectionOf(
      reg.withTransaction(async () => {
        await repo.insert({ name: "Ghost" });
        expect(await Named.named("Ghost")).to.include({ name: "Ghost" });
        throw failure;
      }),
    );
    expect(error).to.equal(failure);
    expect(await reg.withSession(() => repo.find())).to.deep.equal([{ id: 1, name: "Rex" }]);
    expect(await reg.withSession(() => Named.named("Ghost"))).to.equal(null);
  });

  it("url: builds the DataSource with the application's typeorm", async () => {
    const cwd = process.cwd();
    process.chdir(copy.dir);
    try {
      reg = createSessionRegistry({ url: "sqlite::memory:", entities: [pets().Pet], synchronize: true });
    } finally {
      process.chdir(cwd);
    }
    await reg.ready();
    expect(reg.dataSource).to.be.instanceOf(copy.typeorm.DataSource);
    expect(await reg.withSession((s) => s.query("SELECT 1 AS one"))).to.deep.equal([{ one: 1 }]);
  });

  it("what is not a DataSource is refused with both copies' paths and how to dedupe them", () => {
    const cwd = process.cwd();
    process.chdir(copy.dir);
    try {
      expect(() => createSessionRegistry({ dataSource: { options: {} } as never })).to.throw(
        TypeError,
        new RegExp(
          `Expected \`dataSource\`.*${join(copy.dir, "node_modules", "typeorm", "package.json")}.*` +
            `${join(cwd, "node_modules", "typeorm", "package.json")}.*npm dedupe.*overrides.*dedupe-peer-dependents`,
          "s",
        ),
      );
    } finally {
      process.chdir(cwd);
    }
  });
});
