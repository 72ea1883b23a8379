import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { DataSource } from "typeorm";

// The application's typeorm, whatever copy it is. npm link, monorepos and pnpm often
// install two copies: one the application imports, one this library resolves. TypeORM's
// classes are taken from the DataSource the application gives, never from the library's
// own copy, and `url:` builds the DataSource with the application's copy.

/** The constructor of TypeORM's DataSource, from whichever copy. */
export type DataSourceClass = new (options: never) => DataSource;

/**
 * Whether `value` is a TypeORM DataSource of any copy of typeorm: an instance of the
 * library's own class, or an object carrying TypeORM's cross-copy mark (what TypeORM's
 * own `InstanceChecker.isDataSource` reads: `Symbol.for` symbols are shared by every copy),
 * or, for a copy without that mark, one shaped like a DataSource.
 *
 * @internal
 */
export function isDataSource(value: unknown): value is DataSource {
  if (value instanceof DataSource) return true;
  if (typeof value !== "object" || value === null) return false;
  const candidate = value as Record<string, unknown>;
  if (candidate["@instanceof"] === Symbol.for("DataSource")) return true;
  return (
    typeof candidate.initialize === "function" &&
    typeof candidate.createQueryRunner === "function" &&
    typeof candidate.options === "object" &&
    candidate.options !== null &&
    "driver" in candidate &&
    "manager" in candidate
  );
}

/** One installed copy of typeorm. */
interface TypeormCopy {
  /** Its `package.json`. */
  readonly path: string;
  readonly version: string;
  /** Its module (CommonJS exports). */
  readonly module: { DataSource: DataSourceClass; [name: string]: unknown };
}

const ownRequire = createRequire(import.meta.url);

function copyAt(require: NodeJS.Require): TypeormCopy | undefined {
  try {
    const main = require.resolve("typeorm");
    // typeorm's `exports` do not expose its package.json; its main file sits beside it.
    const file = path.join(path.dirname(main), "package.json");
    const { version } = JSON.parse(readFileSync(file, "utf8")) as { version: string };
    return { path: file, version, module: require(main) as TypeormCopy["module"] };
  } catch {
    return undefined;
  }
}

/** The library's own typeorm. @internal */
export function ownTypeorm(): TypeormCopy | undefined {
  return copyAt(ownRequire);
}

/**
 * The application's typeorm: the copy `require("typeorm")` finds from `cwd` (the
 * application's directory), else the library's own.
 *
 * @internal
 */
export function appTypeorm(cwd = process.cwd()): TypeormCopy | undefined {
  return copyAt(createRequire(path.join(cwd, "index.js"))) ?? ownTypeorm();
}

/**
 * A sentence naming both copies of typeorm and how to dedupe them, when the application's
 * copy is not the library's; `""` when there is one copy.
 *
 * @internal
 */
export function typeormCopies(cwd = process.cwd()): string {
  const own = ownTypeorm();
  const app = appTypeorm(cwd);
  if (own === undefined || app === undefined || own.path === app.path) return "";
  return (
    ` Two copies of typeorm are installed: ${app.path} (${app.version}), which the application resolves, and ` +
    `${own.path} (${own.version}), which typeorm-scoped-session resolves. Install one: run \`npm dedupe\`, ` +
    `or pin one version with "overrides" (npm) / "resolutions" (yarn) / "pnpm.overrides", and with pnpm ` +
    `set \`dedupe-peer-dependents=true\` so that typeorm-scoped-session shares the application's typeorm.`
  );
}
