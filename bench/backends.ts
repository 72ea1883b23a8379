/**
 * The databases and the implementations under test. Every implementation gets its own DataSource on the
 * same database (typeorm-transactional patches the DataSource it is given), and all of them run the same
 * statements through an EntityManager: `manager.findOneBy(BenchNote, { id })` and `manager.insert(...)`.
 */
import "reflect-metadata";
import { DataSource, type DataSourceOptions, type EntityManager } from "typeorm";
import {
  addTransactionalDataSource,
  Propagation,
  runInTransaction,
  Transactional as TtTransactional,
} from "typeorm-transactional";
import { createSessionRegistry, currentSession, UsesSession, type SessionRegistry } from "../src/index.js";
import { BenchNote, SEED_ROWS } from "./entities.js";

export type BackendKind = "sqlite" | "postgres";

export interface Backend {
  readonly kind: BackendKind;
  readonly label: string;
  /** For the floor and `dataSource.transaction`. */
  readonly plain: DataSource;
  /** Registered with typeorm-transactional as {@link ttName} (undefined when it was not set up). */
  readonly tt: DataSource | undefined;
  readonly ttName: string;
  /** Ours. */
  readonly registry: SessionRegistry;
  dispose(): Promise<void>;
}

export interface BackendOptions {
  /** Set up typeorm-transactional's DataSource (initializeTransactionalContext must have run). */
  readonly tt: boolean;
  /** Create the table and seed it (once per database). */
  readonly seed: boolean;
}

function dataSourceOptions(kind: BackendKind, location: string, synchronize: boolean): DataSourceOptions {
  return kind === "sqlite"
    ? { type: "sqlite", database: location, entities: [BenchNote], synchronize, enableWAL: true }
    : { type: "postgres", url: location, entities: [BenchNote], synchronize, extra: { max: 5 } };
}

/**
 * SQLite runs in WAL mode with `synchronous = NORMAL` (no fsync per COMMIT), the usual production setting, so
 * that the transactional scenarios measure the code paths rather than the disk.
 */
async function initialize(ds: DataSource): Promise<DataSource> {
  await ds.initialize();
  if (ds.options.type === "sqlite") await ds.query("PRAGMA synchronous = NORMAL");
  return ds;
}

/** `location`: a SQLite file path, or a PostgreSQL URL. */
export async function openBackend(kind: BackendKind, location: string, options: BackendOptions): Promise<Backend> {
  const plain = await initialize(new DataSource(dataSourceOptions(kind, location, options.seed)));
  if (options.seed) await seed(plain);
  const ttName = `bench-${kind}`;
  let tt: DataSource | undefined;
  if (options.tt) {
    tt = addTransactionalDataSource({
      name: ttName,
      dataSource: new DataSource(dataSourceOptions(kind, location, false)),
    });
    await initialize(tt);
  }
  const ours = await initialize(new DataSource(dataSourceOptions(kind, location, false)));
  const registry = createSessionRegistry({ name: `bench-${kind}`, dataSource: ours });
  return {
    kind,
    label: kind === "sqlite" ? "SQLite" : "PostgreSQL",
    plain,
    tt,
    ttName,
    registry,
    async dispose() {
      await registry.drain({ timeoutMs: 5_000 });
      for (const ds of [plain, tt, ours]) if (ds?.isInitialized) await ds.destroy();
    },
  };
}

async function seed(ds: DataSource): Promise<void> {
  if ((await ds.manager.count(BenchNote)) >= SEED_ROWS) return;
  await ds.manager.clear(BenchNote);
  for (let first = 1; first <= SEED_ROWS; first += 250) {
    const rows = [];
    for (let i = first; i < first + 250 && i <= SEED_ROWS; i++) rows.push({ body: `note ${i}`, n: i });
    await ds.manager.insert(BenchNote, rows);
  }
}

// ---------------------------------------------------------------------------------------------------------

export type ScenarioId = "empty" | "read" | "tx2" | "conc64" | "nested" | "emptyTx";

/** The scenarios of the main table (`emptyTx` is used by the memory part only). */
export const SCENARIOS: readonly { id: ScenarioId; label: string }[] = [
  { id: "empty", label: "empty block" },
  { id: "read", label: "one PK read" },
  { id: "tx2", label: "tx: 2 inserts" },
  { id: "conc64", label: "64 concurrent reads (batch)" },
  { id: "nested", label: "nested join (tx + read)" },
];

export type ImplId = "floor" | "dsTransaction" | "ttRun" | "ttDecorator" | "oursBlock" | "oursDecorator";

export const IMPLS: readonly { id: ImplId; label: string }[] = [
  { id: "floor", label: "floor: QueryRunner try/finally" },
  { id: "dsTransaction", label: "dataSource.transaction" },
  { id: "ttRun", label: "typeorm-transactional runInTransaction" },
  { id: "ttDecorator", label: "typeorm-transactional @Transactional" },
  { id: "oursBlock", label: "ours withSession / withTransaction" },
  { id: "oursDecorator", label: "ours @UsesSession" },
];

export type Op = () => Promise<unknown>;
export type Ops = Partial<Record<ScenarioId, Op>>;

/** Runs `fn` (once per round) `CONCURRENCY` times at once. */
export const CONCURRENCY = 64;
const concurrently =
  (fn: Op): Op =>
  () =>
    Promise.all(Array.from({ length: CONCURRENCY }, fn));

const empty = async (_?: unknown): Promise<undefined> => undefined;

/** The operations of each implementation on `b`; a scenario an implementation has no form for is absent. */
export function makeOps(b: Backend): Record<ImplId, Ops> {
  let cursor = 0;
  const nextId = (): number => (cursor = (cursor % SEED_ROWS) + 1);
  let inserted = 0;
  const row = () => ({ body: "bench", n: ++inserted });
  const read = (m: EntityManager) => m.findOneBy(BenchNote, { id: nextId() });
  const insertTwo = async (m: EntityManager) => {
    await m.insert(BenchNote, row());
    await m.insert(BenchNote, row());
  };

  // --- the floor: what careful code does by hand -------------------------------------------------------
  const { plain } = b;
  const floorBlock = async <T>(body: (m: EntityManager) => Promise<T>): Promise<T> => {
    const qr = plain.createQueryRunner();
    try {
      return await body(qr.manager);
    } finally {
      await qr.release();
    }
  };
  const floorTx = async <T>(body: (m: EntityManager) => Promise<T>): Promise<T> => {
    const qr = plain.createQueryRunner();
    try {
      await qr.startTransaction();
      try {
        const value = await body(qr.manager);
        await qr.commitTransaction();
        return value;
      } catch (error) {
        await qr.rollbackTransaction();
        throw error;
      }
    } finally {
      await qr.release();
    }
  };
  const floorRead = () => floorBlock(read);

  // --- ours ----------------------------------------------------------------------------------------------
  const { registry } = b;
  const oursRead = () => registry.withSession((s) => read(s.manager));
  class OursService {
    @UsesSession({ registry })
    async empty(): Promise<undefined> {
      return undefined;
    }

    @UsesSession({ registry })
    async read(): Promise<BenchNote | null> {
      return read(currentSession(registry).manager);
    }

    @UsesSession({ registry, transaction: true })
    async tx2(): Promise<void> {
      await insertTwo(currentSession(registry).manager);
    }

    @UsesSession({ registry, transaction: true })
    async nested(): Promise<BenchNote | null> {
      return this.read();
    }

    @UsesSession({ registry, transaction: true })
    async emptyTx(): Promise<undefined> {
      return undefined;
    }
  }
  const ours = new OursService();

  const ops: Record<ImplId, Ops> = {
    floor: {
      empty: () => floorBlock(empty),
      read: floorRead,
      tx2: () => floorTx(insertTwo),
      conc64: concurrently(floorRead),
      nested: () => floorTx((m) => read(m)),
      emptyTx: () => floorTx(empty),
    },
    dsTransaction: {
      tx2: () => plain.transaction(insertTwo),
      nested: () => plain.transaction((m) => read(m)),
      emptyTx: () => plain.transaction(empty),
    },
    ttRun: {},
    ttDecorator: {},
    oursBlock: {
      empty: () => registry.withSession(empty),
      read: oursRead,
      tx2: () => registry.withTransaction((s) => insertTwo(s.manager)),
      conc64: concurrently(oursRead),
      nested: () => registry.withTransaction(() => registry.withSession((s) => read(s.manager))),
      emptyTx: () => registry.withTransaction(empty),
    },
    oursDecorator: {
      empty: () => ours.empty(),
      read: () => ours.read(),
      tx2: () => ours.tx2(),
      conc64: concurrently(() => ours.read()),
      nested: () => ours.nested(),
      emptyTx: () => ours.emptyTx(),
    },
  };

  // --- typeorm-transactional: non-transactional blocks are Propagation.SUPPORTS ---------------------------
  if (b.tt !== undefined) {
    const ttDs: DataSource = b.tt;
    const connectionName = b.ttName;
    const supports = { connectionName, propagation: Propagation.SUPPORTS };
    const required = { connectionName };
    // Its patched `dataSource.manager` is the transaction's manager inside one, else the default one.
    const ttRead = () => runInTransaction(() => read(ttDs.manager), supports);
    class TtService {
      @TtTransactional(supports)
      async empty(): Promise<undefined> {
        return undefined;
      }

      @TtTransactional(supports)
      async read(): Promise<BenchNote | null> {
        return read(ttDs.manager);
      }

      @TtTransactional(required)
      async tx2(): Promise<void> {
        await insertTwo(ttDs.manager);
      }

      @TtTransactional(required)
      async nested(): Promise<BenchNote | null> {
        return this.innerRead();
      }

      @TtTransactional(required)
      async innerRead(): Promise<BenchNote | null> {
        return read(ttDs.manager);
      }

      @TtTransactional(required)
      async emptyTx(): Promise<undefined> {
        return undefined;
      }
    }
    const tt = new TtService();
    ops.ttRun = {
      empty: () => runInTransaction(empty, supports),
      read: ttRead,
      tx2: () => runInTransaction(() => insertTwo(ttDs.manager), required),
      conc64: concurrently(ttRead),
      nested: () => runInTransaction(() => runInTransaction(() => read(ttDs.manager), required), required),
      emptyTx: () => runInTransaction(empty, required),
    };
    ops.ttDecorator = {
      empty: () => tt.empty(),
      read: () => tt.read(),
      tx2: () => tt.tx2(),
      conc64: concurrently(() => tt.read()),
      nested: () => tt.nested(),
      emptyTx: () => tt.emptyTx(),
    };
  }
  return ops;
}
