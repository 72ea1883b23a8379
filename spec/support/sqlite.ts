import "reflect-metadata";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DataSource } from "typeorm";
import { createSessionRegistry, type SessionRegistry } from "../../src/index.js";
import { Account, Note } from "./entities.js";

export const ENTITIES = [Note, Account];

/** A file-backed SQLite database in a fresh temporary directory. */
export class TempSqlite {
  readonly dir = mkdtempSync(join(tmpdir(), "tss-spec-"));
  readonly path = join(this.dir, "test.db");
  readonly #sources: DataSource[] = [];

  /** A new, not yet initialized DataSource on this file. */
  dataSource(): DataSource {
    const ds = new DataSource({ type: "sqlite", database: this.path, entities: ENTITIES, synchronize: true });
    this.#sources.push(ds);
    return ds;
  }

  /** A registry on a new DataSource on this file. */
  registry(name = "test"): SessionRegistry {
    return createSessionRegistry({ name, dataSource: this.dataSource() });
  }

  async dispose(): Promise<void> {
    for (const ds of this.#sources) if (ds.isInitialized) await ds.destroy();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
