import { DataSource, type DataSourceOptions } from "typeorm";
import { createSessionRegistry, type SessionRegistry } from "../../src/index.js";

/** What every test database does alike: the DataSources made on it are destroyed by `dispose()`. */
export abstract class TestDatabase {
  readonly #sources: DataSource[] = [];

  /** The options of a DataSource on this database. */
  protected abstract options(extra: Partial<DataSourceOptions>): DataSourceOptions;

  /** A new, not yet initialized DataSource on this database. */
  dataSource(extra: Partial<DataSourceOptions> = {}): DataSource {
    const ds = new DataSource(this.options(extra));
    this.#sources.push(ds);
    return ds;
  }

  /** A registry on a new DataSource on this database. */
  registry(name = "test"): SessionRegistry {
    return createSessionRegistry({ name, dataSource: this.dataSource() });
  }

  async dispose(): Promise<void> {
    for (const ds of this.#sources) if (ds.isInitialized) await ds.destroy();
  }
}
