import { expect } from "chai";
import sinon from "sinon";
import {
  Column,
  DataSource,
  type DeepPartial,
  Entity,
  EntityManager,
  type EntityTarget,
  JoinTable,
  ManyToMany,
  ManyToOne,
  OneToMany,
  PrimaryGeneratedColumn,
  type ObjectLiteral,
  type QueryRunner,
  RelationId,
  Table,
  Tree,
  TreeChildren,
  TreeParent,
} from "typeorm";
import { createSessionRegistry, type Session, SessionClosedError, type SessionRegistry } from "../src/index.js";
import { type Backend, forEachBackend, type TestDb } from "./support/backends.js";
import { Account, Note } from "./support/entities.js";
import { ENTITIES } from "./support/sqlite.js";
import { deferred, rejectionOf, turns } from "./support/util.js";

// Every TypeORM path a session's manager, repositories and query builders take must run
// on the session's own runner: none may reach the database through the DataSource's
// manager or a query runner of its own.

@Entity("paths_publisher")
class Publisher {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  name!: string;
}

@Entity("paths_tag")
class Tag {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text", { unique: true })
  label!: string;

  @Column("integer", { default: 0 })
  uses!: number;
}

@Entity("paths_author")
class Author {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  name!: string;

  @OneToMany(() => Book, (book) => book.author, { cascade: true })
  books!: Book[];
}

@Entity("paths_book")
class Book {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  title!: string;

  @ManyToOne(() => Author, (author) => author.books, { nullable: true, onDelete: "CASCADE" })
  author!: Author | null;

  @ManyToOne(() => Publisher, { eager: true, nullable: true, cascade: true })
  publisher!: Publisher | null;

  @ManyToOne(() => Author, { lazy: true, nullable: true })
  editor!: Promise<Author | null>;

  @ManyToMany(() => Tag, { cascade: true })
  @JoinTable({ name: "paths_book_tags" })
  tags!: Tag[];

  @RelationId((book: Book) => book.tags)
  tagIds!: number[];
}

@Entity("paths_category")
@Tree("closure-table", { closureTableName: "paths_category" })
class Category {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  name!: string;

  @TreeChildren()
  children!: Category[];

  @TreeParent()
  parent!: Category | null;
}

const PATH_ENTITIES = [Publisher, Tag, Author, Book, Category];
const PATH_TABLES = [
  "paths_book_tags",
  "paths_book",
  "paths_author",
  "paths_publisher",
  "paths_tag",
  "paths_category_closure",
  "paths_category",
  "paths_tmp_a",
  "paths_tmp_b",
  "paths_query_cache",
];

/** SQL that begins, ends or marks a transaction, as TypeORM's runners send it. */
const CONTROL = /^(BEGIN|START TRANSACTION|COMMIT|ROLLBACK|SAVEPOINT|RELEASE SAVEPOINT)\b/;

class Boom extends Error {}

forEachBackend("TypeORM paths on the session", (backend: Backend) => {
  let db: TestDb;
  let ds: DataSource;
  let reg: SessionRegistry;
  // SQLite: a transaction that may write takes the write lock as it begins.
  const begin = backend.kind === "postgres" ? "START TRANSACTION" : "BEGIN IMMEDIATE TRANSACTION";

  beforeEach(async () => {
    db = await backend.open();
    // This suite's own tables: dropped first, so that each test starts from empty ones.
    const cleaner = db.dataSource({ synchronize: false });
    await cleaner.initialize();
    for (const table of PATH_TABLES) {
      await cleaner.query(`DROP TABLE IF EXISTS ${table}${backend.kind === "postgres" ? " CASCADE" : ""}`);
    }
    await cleaner.destroy();
    ds = db.dataSource({ entities: [...ENTITIES, ...PATH_ENTITIES], synchronize: true });
    reg = createSessionRegistry({ name: "paths", dataSource: ds });
  });
  afterEach(() => db.dispose());

  /**
   * Run `body` in a session and check that nothing it did took a query runner other
   * than the session's: every path TypeORM has around the session (the DataSource's
   * manager, a query builder without a runner) asks the driver for one.
   */
  async function onSession<T>(body: (s: Session) => Promise<T>, transaction = false): Promise<T> {
    return reg.withSession(
      async (s) => {
        void s.queryRunner; // the session's own runner, made before the spy
        const made = sinon.spy(ds.driver, "createQueryRunner");
        try {
          const result = await body(s);
          expect(made.callCount, "query runners made around the session").to.equal(0);
          return result;
        } finally {
          made.restore();
        }
      },
      { transaction },
    );
  }

  describe("preload", () => {
    it("loads through the session: it sees the session's own uncommitted row", async () => {
      await onSession(async (s) => {
        const notes = s.getRepository(Note);
        const { id } = await notes.save({ body: "uncommitted" });
        const preloaded = await notes.preload({ id, body: "changed" });
        expect(preloaded).to.include({ id, body: "changed" });
        const viaManager = await s.manager.preload(Note, { id });
        expect(viaManager).to.include({ id, body: "uncommitted" });
      }, true);
    });

    it("loads related entities through the session too", async () => {
      await onSession(async (s) => {
        const author = await s.getRepository(Author).save({ name: "Ann", books: [{ title: "One" }] });
        const bookId = author.books[0]!.id;
        const preloaded = await s.getRepository(Author).preload({ id: author.id, books: [{ id: bookId }] });
        expect(preloaded?.name).to.equal("Ann");
        expect(preloaded?.books.map((b) => b.title)).to.deep.equal(["One"]);
      }, true);
    });

    it("on a repository from extend() and withRepository()", async () => {
      await onSession(async (s) => {
        const { id } = await s.getRepository(Note).save({ body: "mine" });
        const custom = s.getRepository(Note).extend({ byId: (n: number) => ({ id: n }) });
        expect(await custom.preload(custom.byId(id))).to.include({ body: "mine" });
        const bound = s.manager.withRepository(ds.getRepository(Note));
        expect(await bound.preload({ id })).to.include({ body: "mine" });
      }, true);
    });

    it("a customized createEntityManager() whose manager overrides preload: its override runs, on the session", async () => {
      class Audited extends EntityManager {
        preloads = 0;
        override preload<E extends ObjectLiteral>(target: EntityTarget<E>, like: DeepPartial<E>) {
          this.preloads++;
          return super.preload(target, like);
        }
      }
      class AuditedDataSource extends DataSource {
        override createEntityManager(queryRunner?: QueryRunner): EntityManager {
          return new Audited(this, queryRunner);
        }
      }
      ds = new AuditedDataSource(ds.options);
      reg = createSessionRegistry({ name: "audited", dataSource: ds });
      try {
        await onSession(async (s) => {
          const { id } = await s.getRepository(Note).save({ body: "uncommitted" });
          expect(await s.getRepository(Note).preload({ id })).to.include({ body: "uncommitted" });
          expect(s.manager).to.be.instanceOf(Audited);
          expect((s.manager as Audited).preloads).to.equal(1);
        }, true);
      } finally {
        if (ds.isInitialized) await ds.destroy();
      }
    });

    if (backend.kind === "sqlite") {
      it("does not read another session's uncommitted row on the shared connection", async () => {
        const inserted = deferred();
        const started = deferred<{ preloading: Promise<unknown> }>();
        const writer = reg.withTransaction(async (s) => {
          await s.getRepository(Note).insert({ id: 1, body: "uncommitted" });
          inserted.resolve();
          // Give the reader's preload every chance to run while this transaction is open
          // (once it is fixed, it waits for the connection until the ROLLBACK).
          const { preloading } = await started.promise;
          await Promise.race([preloading.catch(() => undefined), turns(200)]);
          throw new Boom("rolls back");
        });
        const reader = (async () => {
          await inserted.promise;
          return reg.withSession(async (s) => {
            const notes = s.getRepository(Note);
            const preloading = notes.preload({ id: 1 });
            started.resolve({ preloading });
            const found = notes.findOneBy({ id: 1 });
            return { preloaded: await preloading, found: await found };
          });
        })();
        expect(await rejectionOf(writer)).to.be.instanceOf(Boom);
        expect(await reader).to.deep.equal({ preloaded: undefined, found: null });
      });
    }
  });

  describe("paths that run on the session (regressions)", () => {
    it("query builders from the manager and from repositories", async () => {
      await onSession(async (s) => {
        await s.getRepository(Note).insert([
          { body: "a", block: 1 },
          { body: "b", block: 2 },
        ]);
        const viaManager = await s.manager
          .createQueryBuilder(Note, "n")
          .where("n.block = :block", { block: 1 })
          .getMany();
        expect(viaManager.map((n) => n.body)).to.deep.equal(["a"]);
        const qb = s.getRepository(Note).createQueryBuilder("n").orderBy("n.id");
        expect((await qb.getMany()).map((n) => n.body)).to.deep.equal(["a", "b"]);
        expect(await qb.getCount()).to.equal(2);
        expect(await qb.clone().where("n.block = 2").getExists()).to.equal(true);
        expect(await qb.getManyAndCount()).to.have.length(2);
        expect(
          await s.manager.createQueryBuilder().select("n.body", "body").from(Note, "n").getRawMany(),
        ).to.have.length(2);
        const sub = s.manager.createQueryBuilder(Note, "m").subQuery().select("max(m.id)").from(Note, "m").getQuery();
        expect(await s.manager.createQueryBuilder(Note, "n").where(`n.id = ${sub}`).getOne()).to.include({ body: "b" });
        await s.manager.createQueryBuilder().update(Note).set({ block: 3 }).where("block = :b", { b: 2 }).execute();
        await s.manager.createQueryBuilder().delete().from(Note).where("block = :b", { b: 3 }).execute();
        expect(await s.getRepository(Note).count()).to.equal(1);
      }, true);
    });

    it("find with eager relations, relations:, relation ids and the query strategy; lazy relations", async () => {
      await onSession(async (s) => {
        const editor = await s.getRepository(Author).save({ name: "Ed" });
        const author = s.manager.create(Author, {
          name: "Ann",
          books: [{ title: "One", publisher: { name: "Pub" }, tags: [{ label: "x" }, { label: "y" }] }],
        });
        await s.manager.save(author);
        await s.query(
          backend.kind === "postgres"
            ? `UPDATE paths_book SET "editorId" = $1`
            : `UPDATE paths_book SET "editorId" = ?`,
          [editor.id],
        );
        const [book] = await s.getRepository(Book).find({ relations: { author: true, tags: true } });
        expect(book!.publisher?.name, "eager").to.equal("Pub");
        expect(book!.author?.name, "relations:").to.equal("Ann");
        expect(book!.tags.map((t) => t.label).sort()).to.deep.equal(["x", "y"]);
        expect(book!.tagIds, "@RelationId").to.have.length(2);
        const byQuery = await s.getRepository(Author).find({
          relations: { books: { tags: true } },
          relationLoadStrategy: "query",
          where: { name: "Ann" },
        });
        expect(byQuery[0]!.books[0]!.tags).to.have.length(2);
        const ids = await s.getRepository(Book).find({ loadRelationIds: true });
        expect(ids[0]!.tags).to.have.length(2);
        expect((await book!.editor)?.name, "lazy").to.equal("Ed");
        const loaded = await s.manager.createQueryBuilder().relation(Author, "books").of(author.id).loadMany<Book>();
        expect(loaded.map((b) => b.title)).to.deep.equal(["One"]);
      }, true);
    });

    it("lazy relations of entities made by s.manager.create() load through the session", async () => {
      await onSession(async (s) => {
        const editor = await s.getRepository(Author).save({ name: "Ed" });
        const book = s.manager.create(Book, { title: "One" });
        book.editor = Promise.resolve(editor);
        await book.editor;
        await s.manager.save(book);
        const [again] = await s.getRepository(Book).find();
        expect((await again!.editor)?.name).to.equal("Ed");
        const fresh = s.manager.create(Book, { id: book.id });
        expect((await fresh.editor)?.name, "an unloaded lazy relation").to.equal("Ed");
      }, true);
    });

    it("a lazy relation read after its session closed fails with SessionClosedError", async () => {
      const book = await reg.withTransaction(async (s) => {
        const editor = await s.getRepository(Author).save({ name: "Ed" });
        const saved = await s.getRepository(Book).save({ title: "One" });
        await s.query(
          backend.kind === "postgres"
            ? `UPDATE paths_book SET "editorId" = $1`
            : `UPDATE paths_book SET "editorId" = ?`,
          [editor.id],
        );
        return await s.getRepository(Book).findOneByOrFail({ id: saved.id });
      });
      expect(await rejectionOf(book.editor)).to.be.instanceOf(SessionClosedError);
    });

    it("the query result cache (cache: true) reads and writes through the session", async () => {
      ds = db.dataSource({
        entities: [...ENTITIES, ...PATH_ENTITIES],
        synchronize: true,
        cache: { type: "database", tableName: "paths_query_cache" },
      });
      reg = createSessionRegistry({ name: "cached", dataSource: ds });
      await onSession(async (s) => {
        await s.getRepository(Note).insert({ body: "cached" });
        const first = await s.getRepository(Note).find({ cache: { id: "notes", milliseconds: 60_000 } });
        await s.getRepository(Note).insert({ body: "not yet seen" });
        const second = await s.getRepository(Note).find({ cache: { id: "notes", milliseconds: 60_000 } });
        expect(first).to.have.length(1);
        expect(second, "served from the cache").to.have.length(1);
        const [row] = await s.query<{ n: number | string }[]>(
          `SELECT count(*) AS n FROM paths_query_cache WHERE identifier = 'notes'`,
        );
        expect(Number(row!.n)).to.equal(1);
      }, true);
    });

    it("save with cascades, remove, upsert, increment/decrement, count, exists, aggregates, query, clear", async () => {
      await onSession(async (s) => {
        const author = await s.getRepository(Author).save({
          name: "Ann",
          books: [{ title: "One", publisher: { name: "Pub" } }, { title: "Two" }],
        });
        expect(await s.getRepository(Book).count()).to.equal(2);
        expect(await s.getRepository(Publisher).count(), "cascaded insert").to.equal(1);
        author.books[1]!.title = "Two, revised";
        await s.getRepository(Author).save(author);
        expect(await s.getRepository(Book).existsBy({ title: "Two, revised" })).to.equal(true);
        await s.getRepository(Book).remove(author.books[0]!);
        expect(await s.getRepository(Book).exists({ where: { title: "One" } })).to.equal(false);

        const tags = s.getRepository(Tag);
        await tags.upsert([{ label: "x", uses: 1 }], ["label"]);
        await tags.upsert(
          [
            { label: "x", uses: 2 },
            { label: "y", uses: 1 },
          ],
          ["label"],
        );
        expect(await tags.count()).to.equal(2);
        await tags.increment({ label: "x" }, "uses", 5);
        expect(await tags.findOneByOrFail({ label: "x" })).to.include({ uses: 7 });

        const accounts = s.getRepository(Account);
        await accounts.insert([{ balance: 20 }, { balance: 5 }]);
        await accounts.increment({ balance: 20 }, "balance", 5);
        await s.manager.decrement(Account, { balance: 5 }, "balance", 1);
        expect(await accounts.countBy({ balance: 4 })).to.equal(1);
        expect(await accounts.sum("balance")).to.equal(29);
        expect(await accounts.maximum("balance")).to.equal(25);
        expect(await accounts.minimum("balance")).to.equal(4);
        expect(Number(await accounts.average("balance"))).to.equal(14.5);
        expect(await accounts.findAndCount()).to.have.nested.property("[1]", 2);
        expect(await s.manager.query("SELECT count(*) AS n FROM accounts")).to.have.length(1);
        await s.getRepository(Note).insert({ body: "cleared" });
        await s.getRepository(Note).clear();
        expect(await s.getRepository(Note).count()).to.equal(0);
      }, true);
    });

    it("tree repositories (closure table)", async () => {
      await onSession(async (s) => {
        const trees = s.manager.getTreeRepository(Category);
        const root = await trees.save(trees.create({ name: "root" }));
        const child = await trees.save(trees.create({ name: "child", parent: root }));
        await trees.save(trees.create({ name: "grandchild", parent: child }));
        expect(await trees.countDescendants(root)).to.equal(3);
        const [tree] = await trees.findTrees();
        expect(tree!.children[0]!.children[0]!.name).to.equal("grandchild");
        expect((await trees.findAncestors(child)).map((c) => c.name).sort()).to.deep.equal(["child", "root"]);
        expect((await trees.findRoots()).map((c) => c.name)).to.deep.equal(["root"]);
        const descendants = await trees.findDescendantsTree(root);
        expect(descendants.children).to.have.length(1);
      }, true);
    });

    it("manager.transaction(), nested: a savepoint on the session", async () => {
      await onSession(async (s) => {
        await s.manager.transaction(async (m) => {
          await m.getRepository(Note).insert({ body: "outer" });
          await m.transaction(async (inner) => {
            await inner.getRepository(Note).insert({ body: "inner" });
          });
          await rejectionOf(
            m.transaction(async (inner) => {
              await inner.getRepository(Note).insert({ body: "undone" });
              throw new Boom("inner fails");
            }),
          );
          expect(await m.getRepository(Note).countBy({ body: "undone" })).to.equal(0);
        });
        expect((await s.getRepository(Note).find({ order: { id: "ASC" } })).map((n) => n.body)).to.deep.equal([
          "outer",
          "inner",
        ]);
      });
    });
  });

  // These describe what the session's runner view must do; they fail until the runner
  // view (src/core/session/runner-view.ts) handles them.
  describe("runner view (lead's fix)", () => {
    const tmp = (name: string) => new Table({ name, columns: [{ name: "id", type: "integer", isPrimary: true }] });

    it("undo SQL recorded by an earlier session's schema change is not replayed by the next", async () => {
      await reg.withSession(async (s) => {
        await s.queryRunner.createTable(tmp("paths_tmp_a"));
        await s.queryRunner.executeMemoryDownSql();
      });
      await reg.withSession(async (s) => {
        await s.queryRunner.createTable(tmp("paths_tmp_b"));
        await s.queryRunner.executeMemoryDownSql();
        expect(await s.queryRunner.hasTable("paths_tmp_b")).to.equal(false);
      });
    });

    it("the next session's runner starts with fresh sqlInMemory and loadedTables", async () => {
      await reg.withSession(async (s) => {
        await s.queryRunner.createTable(tmp("paths_tmp_a"));
        await s.queryRunner.dropTable("paths_tmp_a"); // loads it into loadedTables
        expect(s.queryRunner.getMemorySql().downQueries).to.not.be.empty;
      });
      await reg.withSession(async (s) => {
        expect(s.queryRunner.getMemorySql().upQueries).to.deep.equal([]);
        expect(s.queryRunner.getMemorySql().downQueries).to.deep.equal([]);
        // Public in TypeORM 0.3, protected in 1.x.
        expect((s.queryRunner as unknown as { loadedTables: unknown[] }).loadedTables).to.deep.equal([]);
      });
    });

    it("after a session that enabled SQL memory, the next one's schema changes run", async () => {
      await reg.withSession(async (s) => {
        s.queryRunner.enableSqlMemory();
        await s.queryRunner.createTable(tmp("paths_tmp_a"));
        expect(await s.queryRunner.hasTable("paths_tmp_a")).to.equal(false);
      });
      await reg.withSession(async (s) => {
        await s.queryRunner.createTable(tmp("paths_tmp_b"));
        expect(await s.queryRunner.hasTable("paths_tmp_b")).to.equal(true);
        expect(
          s.queryRunner
            .getMemorySql()
            .upQueries.map((q) => q.query)
            .join("\n"),
        ).to.not.include("paths_tmp_a");
      });
    });

    /** Replace `name` on `runner` with a spy that calls what it replaces, as sinon and APM agents do. */
    function spyOn<K extends "query" | "startTransaction" | "commitTransaction" | "rollbackTransaction">(
      runner: QueryRunner,
      name: K,
    ): sinon.SinonSpy {
      const original = runner[name] as (...args: unknown[]) => unknown;
      const spy = sinon.spy(function (this: QueryRunner, ...args: unknown[]) {
        return original.apply(this, args);
      });
      runner[name] = spy as unknown as QueryRunner[K];
      return spy;
    }

    it("a query spy assigned on s.queryRunner sees the session's statements and its BEGIN/SAVEPOINT/COMMIT/ROLLBACK", async () => {
      await reg.withSession(async (s) => {
        const query = spyOn(s.queryRunner, "query");
        await reg.withTransaction(async () => {
          await s.query("SELECT 1 AS mine");
          await reg.withTransaction(() => s.getRepository(Note).insert({ body: "kept" }));
          await rejectionOf(
            reg.withTransaction(async () => {
              await s.getRepository(Note).insert({ body: "undone" });
              throw new Boom("inner fails");
            }),
          );
        });
        await rejectionOf(
          reg.withTransaction(() => {
            throw new Boom("outer fails");
          }),
        );
        const sql = query.getCalls().map((call) => String(call.args[0]));
        expect(sql).to.include("SELECT 1 AS mine");
        expect(sql.filter((q) => CONTROL.test(q))).to.deep.equal([
          begin,
          "SAVEPOINT typeorm_1",
          "RELEASE SAVEPOINT typeorm_1",
          "SAVEPOINT typeorm_1",
          "ROLLBACK TO SAVEPOINT typeorm_1",
          "COMMIT",
          begin,
          "ROLLBACK",
        ]);
      });
    });

    it("a query spy assigned on one session's runner does not see another session's statements", async () => {
      const assigned = deferred();
      const other = deferred();
      const mine = reg.withSession(async (s) => {
        const query = spyOn(s.queryRunner, "query");
        assigned.resolve();
        await other.promise;
        await s.query("SELECT 1 AS mine");
        return query.getCalls().map((call) => String(call.args[0]));
      });
      await assigned.promise;
      await reg.withSession((s) => s.query("SELECT 2 AS theirs"));
      other.resolve();
      expect(await mine).to.deep.equal(["SELECT 1 AS mine"]);
    });

    it("startTransaction/commitTransaction/rollbackTransaction spies on s.queryRunner are called by transactional blocks", async () => {
      await reg.withSession(async (s) => {
        const start = spyOn(s.queryRunner, "startTransaction");
        const commit = spyOn(s.queryRunner, "commitTransaction");
        const rollback = spyOn(s.queryRunner, "rollbackTransaction");
        await reg.withTransaction(
          async () => {
            expect(start.callCount, "called as the block begins").to.equal(1);
            expect(start.firstCall.args[0]).to.equal("SERIALIZABLE");
            expect(s.inTransaction).to.equal(true);
            await s.getRepository(Note).insert({ body: "outer" });
            await reg.withTransaction(() => s.getRepository(Note).insert({ body: "nested" }));
            expect(start.callCount, "the nested block's savepoint").to.equal(2);
            expect(commit.callCount, "the nested block's release").to.equal(1);
          },
          { isolation: "SERIALIZABLE" },
        );
        expect(commit.callCount).to.equal(2);
        await rejectionOf(
          reg.withTransaction(() => {
            throw new Boom("rolls back");
          }),
        );
        expect(start.callCount).to.equal(3);
        expect(rollback.callCount).to.equal(1);
      });
      expect(await reg.withSession((s) => s.getRepository(Note).count())).to.equal(2);
    });
  });
});
