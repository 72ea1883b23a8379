import { expect } from "chai";
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { useTransactionalTests } from "../src/testing/index.js";

const here = dirname(fileURLToPath(import.meta.url));
const RUN_TIMEOUT_MS = 60_000;

interface Run {
  code: number | null;
  output: string;
}

/** Run `node args...` in a child process, bounded; its exit code and its whole output. */
function node(args: string[], cwd: string, timeout = RUN_TIMEOUT_MS): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      args,
      { cwd, timeout, env: { ...process.env, CI: "", NO_COLOR: "1", FORCE_COLOR: "0" } },
      (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof error.code === "number" ? error.code : null;
        resolve({ code, output: `${stdout}${stderr}` });
      },
    );
  });
}

describe("useTransactionalTests() with other test runners", () => {
  it("says how to pass the hooks when the runner has no globals", () => {
    const globals = globalThis as { beforeEach?: unknown };
    const saved = globals.beforeEach;
    globals.beforeEach = undefined;
    try {
      expect(() => useTransactionalTests()).to.throw(TypeError, /hooks: \{ beforeEach, afterEach \}.*node:test/);
    } finally {
      globals.beforeEach = saved;
    }
  });

  it("rejects hooks that are not the runner's functions", () => {
    expect(() => useTransactionalTests({ hooks: { beforeEach, afterEach: 1 as never } })).to.throw(
      TypeError,
      /hooks\.afterEach/,
    );
    expect(() => useTransactionalTests({ hooks: "mocha" as never })).to.throw(TypeError, /hooks/);
  });

  it("node:test: each test runs in a transaction rolled back after it (hooks passed in)", async function () {
    this.timeout(RUN_TIMEOUT_MS + 5_000);
    const suite = join(here, "runners", "node-test.suite.js");
    const run = await node(["--test", "--test-reporter=tap", suite], here);
    expect(run.output, run.output).to.match(/^# pass 3$/m);
    expect(run.output, run.output).to.match(/^# fail 0$/m);
    expect(run.code, run.output).to.equal(0);
  });

  describe("Vitest", function () {
    let vitest: string | undefined;
    let dir: string;

    before(async function () {
      this.timeout(200_000);
      vitest = await findVitest();
      if (vitest === undefined) this.skip();
      // Beside vitest's node_modules, so that the suites' `import "vitest"` resolves.
      dir = join(dirname(dirname(dirname(vitest))), `.tss-suites-${process.pid}`);
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, "globals.test.mjs"), vitestSuite(false));
      writeFileSync(join(dir, "imported.test.mjs"), vitestSuite(true));
    });

    after(() => {
      if (vitest !== undefined) rmSync(dir, { recursive: true, force: true });
    });

    it("with globals: true, the global hooks are found", async function () {
      this.timeout(RUN_TIMEOUT_MS + 5_000);
      const run = await node([vitest!, "run", "--root", dir, "--globals", "globals.test.mjs"], dir);
      expect(run.output, run.output).to.match(/Tests\s+3 passed \(3\)/);
      expect(run.code, run.output).to.equal(0);
    });

    it("without globals, with the hooks imported from vitest", async function () {
      this.timeout(RUN_TIMEOUT_MS + 5_000);
      const run = await node([vitest!, "run", "--root", dir, "imported.test.mjs"], dir);
      expect(run.output, run.output).to.match(/Tests\s+3 passed \(3\)/);
      expect(run.code, run.output).to.equal(0);
    });
  });
});

/** A Vitest suite on the built library: with the hooks imported and passed, or with the globals. */
function vitestSuite(passHooks: boolean): string {
  const lib = (path: string) => JSON.stringify(pathToFileURL(join(here, "..", path)).href);
  const reflect = JSON.stringify(
    pathToFileURL(join(here, "..", "..", "node_modules", "reflect-metadata", "Reflect.js")).href,
  );
  return `import ${reflect};
import { ${passHooks ? "afterEach, beforeEach, " : ""}afterAll, describe, expect, it } from "vitest";
import { createSessionRegistry } from ${lib("src/index.js")};
import { useTransactionalTests } from ${lib("src/testing/index.js")};
import { Note } from ${lib("spec/support/entities.js")};

const db = createSessionRegistry({ name: "vitest", url: "sqlite::memory:", entities: [Note], synchronize: true });
const notes = db.getRepository(Note);

describe("useTransactionalTests() under Vitest", () => {
  afterAll(async () => {
    expect(await db.withSession((s) => s.getRepository(Note).count())).toBe(0);
    await db.drain({ destroy: true });
  });
  const testSession = useTransactionalTests({ registry: db${passHooks ? ", hooks: { beforeEach, afterEach }" : ""} });

  it("a block commits into the test's transaction", async () => {
    await db.withTransaction((s) => s.getRepository(Note).insert({ body: "ada" }));
    await expect(db.withTransaction(async (s) => {
      await s.getRepository(Note).insert({ body: "undone" });
      throw new Error("undone");
    })).rejects.toThrow("undone");
    expect((await notes.find()).map((n) => n.body)).toEqual(["ada"]);
    expect(db.current()).toBe(testSession());
  });

  it("the next test sees a clean database", async () => {
    expect(await notes.count()).toBe(0);
  });

  it("the outer transaction is invisible to the code under test", async () => {
    expect(testSession().inTransaction).toBe(false);
    await db.withTransaction((s) => expect(s.inTransaction).toBe(true), { durable: true });
  });
});
`;
}

/**
 * Vitest's CLI: from this project's node_modules, else from a cached install in the temp
 * directory (installed now when missing and the registry is reachable); `undefined`, after one
 * line saying why, where neither works (offline, or TSS_VITEST=0).
 */
async function findVitest(): Promise<string | undefined> {
  if (process.env.TSS_VITEST === "0") {
    console.log("  (Vitest specs skipped: TSS_VITEST=0)");
    return undefined;
  }
  const local = join(here, "..", "..", "node_modules", "vitest", "vitest.mjs");
  if (existsSync(local)) return local;
  const prefix = join(tmpdir(), "tss-vitest");
  const cached = join(prefix, "node_modules", "vitest", "vitest.mjs");
  if (existsSync(cached)) return cached;
  const npm = join(dirname(process.execPath), "..", "lib", "node_modules", "npm", "bin", "npm-cli.js");
  const args = [npm, "install", "--prefix", prefix, "--no-audit", "--no-fund", "--silent", "vitest@3"];
  const run = existsSync(npm) ? await node(args, tmpdir(), 180_000) : { code: null, output: "npm not found" };
  if (run.code === 0 && existsSync(cached)) return cached;
  console.log(
    `  (Vitest specs skipped: vitest is not installed and could not be installed: ${run.output.trim().split("\n").pop()})`,
  );
  return undefined;
}
