import "reflect-metadata";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { DataSourceOptions } from "typeorm";
import { TestDatabase } from "./databases.js";
import { Account, Note } from "./entities.js";

export const ENTITIES = [Note, Account];

/**
 * The SQLite driver under test: `sqlite` (sqlite3, the default on TypeORM 0.3) or
 * `better-sqlite3` (the only one on TypeORM 1.x), from TSS_SQLITE_DRIVER.
 */
export const SQLITE_DRIVER = process.env.TSS_SQLITE_DRIVER ?? "sqlite";
if (SQLITE_DRIVER !== "sqlite" && SQLITE_DRIVER !== "better-sqlite3") {
  throw new Error(`TSS_SQLITE_DRIVER must be sqlite or better-sqlite3, got ${SQLITE_DRIVER}`);
}

/** DataSource options for a SQLite file (or ":memory:") on the driver under test. */
export function sqliteOptions(database: string, extra: Partial<DataSourceOptions> = {}): DataSourceOptions {
  return { type: SQLITE_DRIVER, database, entities: ENTITIES, synchronize: true, ...extra } as DataSourceOptions;
}

/** A file-backed SQLite database in a fresh temporary directory. */
export class TempSqlite extends TestDatabase {
  readonly kind = "sqlite";
  readonly dir = mkdtempSync(join(tmpdir(), "tss-spec-"));
  readonly path = join(this.dir, "test.db");

  protected options(extra: Partial<DataSourceOptions>): DataSourceOptions {
    return sqliteOptions(this.path, extra);
  }

  override async dispose(): Promise<void> {
    await super.dispose();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
