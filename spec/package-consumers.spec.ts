import { join } from "node:path";
import { expect } from "chai";
import { SQLITE_DRIVER } from "./support/sqlite.js";
import { attempt, Lanes, packAndInstall, root, specifiers, writeFiles } from "./support/packed.js";

/** The TypeScript compilers a consumer project may have (installed by packAndInstall). */
const COMPILERS = { "5.0": "ts50", "5.7": "typescript", "7": "ts7" } as const;

/**
 * Subpaths left out where their own peer cannot be: fastify 5's declarations need TypeScript
 * 5.4+ (`NoInfer`) when library declarations are checked; @nestjs/common 12 is an ES module only,
 * which Jest's CommonJS runtime cannot load on Node before 24.9 (Nest 11 is CommonJS).
 */
const without = (...left: string[]) => specifiers.filter((s) => !left.some((l) => s.endsWith(`/${l}`)));
const JEST_SPECIFIERS = without("nestjs");

/** A consumer file importing every subpath and using the main entry's values, types and decorators. */
const consumerSource = (specifiers: string[]) => `import "reflect-metadata";
import { currentSession, defaultRegistry, SessionError, Transactional, withSession, type Session } from "typeorm-scoped-session";
${specifiers.map((s, i) => `import * as subpath${i} from ${JSON.stringify(s)};`).join("\n")}

export const modules: object[] = [${specifiers.map((_, i) => `subpath${i}`).join(", ")}];
export const registry = defaultRegistry;
export function work(): Promise<Session> {
  return withSession(async (session) => session);
}
export function isOurs(e: unknown): boolean {
  return e instanceof SessionError;
}
export class CatsService {
  @Transactional()
  async create(): Promise<Session> {
    return currentSession();
  }
}
`;

/** The tsconfig.json of a project made by the NestJS CLI (TypeScript 5.7, CommonJS). */
const NEST_TSCONFIG = {
  module: "commonjs",
  declaration: true,
  removeComments: true,
  emitDecoratorMetadata: true,
  experimentalDecorators: true,
  allowSyntheticDefaultImports: true,
  target: "ES2023",
  sourceMap: true,
  outDir: "./dist",
  baseUrl: "./",
  incremental: true,
  skipLibCheck: true,
  strictNullChecks: true,
  forceConsistentCasingInFileNames: true,
  noImplicitAny: false,
  strictBindCallApply: false,
  noFallthroughCasesInSwitch: false,
};

interface Setup {
  readonly name: string;
  /** Subpaths whose own peer does not support this setup. */
  readonly specifiers?: string[];
  readonly typescript: keyof typeof COMPILERS;
  readonly type: "commonjs" | "module";
  readonly options: Record<string, unknown>;
}

/** Strict settings with only ES2020's library, checking the package's declarations too. */
const strict = { strict: true, target: "ES2020", types: ["node"], skipLibCheck: false };
/** The same, trusting declarations (TypeScript 5.x is slow to check TypeORM's): consumer code only. */
const quick = { ...strict, skipLibCheck: true };

const SETUPS: Setup[] = [
  {
    name: "TypeScript 5.0, CommonJS, node10 resolution (`moduleResolution: node`), every subpath but fastify",
    typescript: "5.0",
    specifiers: without("fastify"),
    type: "commonjs",
    options: { ...strict, module: "commonjs", moduleResolution: "node" },
  },
  {
    name: "TypeScript 5.7, the NestJS starter (CommonJS, legacy decorators)",
    typescript: "5.7",
    type: "commonjs",
    options: NEST_TSCONFIG,
  },
  {
    name: "TypeScript 5.7, nodenext from CommonJS",
    typescript: "5.7",
    type: "commonjs",
    options: { ...quick, module: "nodenext", moduleResolution: "nodenext" },
  },
  {
    name: "TypeScript 5.7, nodenext from an ES module",
    typescript: "5.7",
    type: "module",
    options: { ...quick, module: "nodenext", moduleResolution: "nodenext" },
  },
  {
    name: "TypeScript 5.0, bundler resolution",
    typescript: "5.0",
    type: "module",
    options: { ...quick, module: "esnext", moduleResolution: "bundler" },
  },
  {
    name: "TypeScript 7, nodenext from an ES module",
    typescript: "7",
    type: "module",
    options: { ...strict, module: "nodenext", moduleResolution: "nodenext" },
  },
  {
    name: "TypeScript 7, nodenext from CommonJS",
    typescript: "7",
    type: "commonjs",
    options: { ...strict, module: "nodenext", moduleResolution: "nodenext" },
  },
  {
    name: "TypeScript 7, CommonJS, legacy decorators",
    typescript: "7",
    type: "commonjs",
    options: { ...strict, module: "commonjs", experimentalDecorators: true, emitDecoratorMetadata: true },
  },
  {
    name: "TypeScript 7, bundler resolution",
    typescript: "7",
    type: "module",
    options: { ...strict, module: "preserve", moduleResolution: "bundler" },
  },
];

/** The error lines of a tsc run about the consumer's files or this package's declarations. */
function ownErrors(output: string): string[] {
  return output
    .split("\n")
    .filter((line) => /error TS\d+/.test(line))
    .filter((line) => !line.includes("node_modules/") || line.includes("node_modules/typeorm-scoped-session/"));
}

const plainTest = (specifiers: string[]) => `const specifiers = ${JSON.stringify(specifiers)};
const lib = require("typeorm-scoped-session");

test("every subpath loads with require()", () => {
  for (const specifier of specifiers) expect(Object.keys(require(specifier)).length).toBeGreaterThan(0);
  expect(() => lib.currentSession()).toThrow(lib.NoActiveSessionError);
});
`;
// The NestJS starter's Jest setup: ts-jest, its tsconfig, a .spec.ts file; a @Transactional
// service on SQLite rolls back when it throws.
const nestTest = (specifiers: string[]) => `import "reflect-metadata";
import { Column, DataSource, Entity, PrimaryGeneratedColumn } from "typeorm";
import { configureSessions, currentSession, defaultRegistry, NoActiveSessionError, Transactional } from "typeorm-scoped-session";
${specifiers.map((s, i) => `import * as subpath${i} from ${JSON.stringify(s)};`).join("\n")}

@Entity()
class Cat {
  @PrimaryGeneratedColumn()
  id!: number;
  @Column()
  name!: string;
}

class CatsService {
  @Transactional()
  async create(name: string, fail: boolean): Promise<void> {
    await currentSession().manager.save(Cat, { name });
    if (fail) throw new Error("rolled back");
  }
}

describe("typeorm-scoped-session under ts-jest", () => {
  const dataSource = new DataSource({ type: ${JSON.stringify(SQLITE_DRIVER)}, database: ":memory:", entities: [Cat], synchronize: true });
  beforeAll(() => configureSessions({ dataSource }));
  afterAll(() => defaultRegistry.drain({ destroy: true }));

  it("loads every subpath", () => {
    for (const loaded of [${specifiers.map((_, i) => `subpath${i}`).join(", ")}]) expect(Object.keys(loaded).length).toBeGreaterThan(0);
    expect(() => currentSession()).toThrow(NoActiveSessionError);
  });

  it("commits a @Transactional method and rolls it back when it throws", async () => {
    const cats = new CatsService();
    await cats.create("Tom", false);
    await expect(cats.create("Felix", true)).rejects.toThrow("rolled back");
    expect((await dataSource.getRepository(Cat).find()).map((c) => c.name)).toEqual(["Tom"]);
  });
});
`;
const NEST_JEST = {
  moduleFileExtensions: ["js", "json", "ts"],
  rootDir: ".",
  testRegex: ".*\\.spec\\.ts$",
  transform: { "^.+\\.(t|j)s$": "ts-jest" },
  testEnvironment: "node",
};

/** Jest runs: name, project folder, tools folder (Jest 29 in the main one), NestJS starter shape. */
const JEST_CASES = [
  ["Jest 29, a plain JavaScript test, every subpath but nestjs", "jest29-plain", "", false],
  ["Jest 29 with ts-jest, as the NestJS starter, every subpath but nestjs", "jest29-nest", "", true],
  ["Jest 30, a plain JavaScript test, every subpath but nestjs", "jest30-plain", "jest30", false],
  ["Jest 30 with ts-jest, as the NestJS starter, every subpath but nestjs", "jest30-nest", "jest30", true],
] as const;

type Outcome = Promise<{ code: number; output: string }>;

describe("the published package in consumer projects", function () {
  this.timeout(600_000);
  const checks = new Map<string, Outcome>();
  const jestRuns = new Map<string, Outcome>();

  before(async () => {
    const packed = await packAndInstall();
    const lanes = new Lanes();
    SETUPS.forEach((setup, index) => {
      const project = join(packed.dir, `ts-${index}`);
      writeFiles(project, {
        "package.json": JSON.stringify({ name: `ts-${index}`, private: true, type: setup.type }),
        "tsconfig.json": JSON.stringify({
          compilerOptions: { ...setup.options, lib: ["es2020"], noEmit: true },
          files: ["index.ts"],
        }),
        "index.ts": consumerSource(setup.specifiers ?? specifiers),
      });
      const tsc = join(packed.dir, "node_modules", COMPILERS[setup.typescript], "bin", "tsc");
      checks.set(
        setup.name,
        lanes.run(() => attempt(process.execPath, [tsc, "-p", project], { cwd: project })),
      );
    });
    // The SQLite driver is borrowed from this repository rather than compiled again.
    const env = { ...process.env, NODE_PATH: join(root, "node_modules"), CI: "true" };
    for (const [name, folder, tools, nest] of JEST_CASES) {
      const project = join(packed.dir, tools, folder);
      writeFiles(
        project,
        nest
          ? {
              "package.json": JSON.stringify({ name: folder, private: true, jest: NEST_JEST }),
              "tsconfig.json": JSON.stringify({ compilerOptions: NEST_TSCONFIG }),
              "cats.spec.ts": nestTest(JEST_SPECIFIERS),
            }
          : {
              "package.json": JSON.stringify({ name: folder, private: true }),
              "consumer.test.js": plainTest(JEST_SPECIFIERS),
            },
      );
      const jest = join(packed.dir, tools, "node_modules", "jest", "bin", "jest.js");
      jestRuns.set(
        name,
        lanes.run(() => attempt(process.execPath, [jest, "--ci", "--colors=false"], { cwd: project, env })),
      );
    }
  });

  describe("type-checks every subpath, under `lib: es2020`", () => {
    for (const setup of SETUPS) {
      it(setup.name, async () => {
        const { code, output } = await checks.get(setup.name)!;
        expect(ownErrors(output), output).to.deep.equal([]);
        // Errors inside other packages' declarations (under es2020) are theirs; there are none today.
        expect(code, output).to.equal(0);
      });
    }
  });

  describe("runs under Jest without a transform of its own", () => {
    for (const [name] of JEST_CASES) {
      it(name, async () => {
        const { code, output } = await jestRuns.get(name)!;
        expect(code, output).to.equal(0);
        expect(output).to.match(/Tests:\s+\d+ passed, \d+ total/);
      });
    }
  });
});
