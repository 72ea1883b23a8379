import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { expect } from "chai";
import { SQLITE_DRIVER } from "./support/sqlite.js";

const root = resolve(import.meta.dirname, "../..");
const npm = process.platform === "win32" ? "npm.cmd" : "npm";

/** The packed tarball, installed into a fresh project next to TypeORM, as a user gets it. */
describe("the published package", function () {
  this.timeout(180_000);
  let dir: string;
  let files: string[];

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "tss-pack-"));
    const packed = JSON.parse(
      execFileSync(npm, ["pack", "--json", "--pack-destination", dir], { cwd: root, encoding: "utf8" }),
    ) as { filename: string; files: { path: string }[] }[];
    files = packed[0]!.files.map((f) => f.path);
    writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "commonjs" }));
    const { peerDependencies } = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as {
      peerDependencies: Record<string, string>;
    };
    expect(Object.keys(peerDependencies).sort()).to.deep.equal([
      "@nestjs/common",
      "@nestjs/core",
      "bullmq",
      "express",
      "fastify",
      "koa",
      "node-cron",
      "reflect-metadata",
      "typeorm",
    ]);
    execFileSync(
      npm,
      [
        "install",
        "--prefer-offline",
        "--no-audit",
        "--no-fund",
        `./${packed[0]!.filename}`,
        "typeorm@0.3",
        "reflect-metadata",
      ],
      { cwd: dir, stdio: "ignore" },
    );
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it("holds only what users need: the build, its types, and the docs", () => {
    expect(files).to.include.members([
      "package.json",
      "README.md",
      "LICENSE",
      "CHANGELOG.md",
      "dist/index.js",
      "dist/index.d.ts",
    ]);
    const unexpected = files.filter(
      (f) => !/^(dist\/.*\.(js|d\.ts|js\.map|d\.ts\.map)|package\.json|README\.md|LICENSE|CHANGELOG\.md)$/.test(f),
    );
    expect(unexpected).to.deep.equal([]);
  });

  it("require() and import() give the same module instance: one defaultRegistry, one scope", () => {
    const script = `
      const viaRequire = require("typeorm-scoped-session");
      import("typeorm-scoped-session").then(async (viaImport) => {
        const same = viaRequire.defaultRegistry === viaImport.defaultRegistry && viaRequire.withSession === viaImport.withSession;
        // A scope opened through one is seen through the other.
        const { DataSource } = require("typeorm");
        viaRequire.configureSessions({ dataSource: new DataSource({ type: ${JSON.stringify(SQLITE_DRIVER)}, database: ":memory:" }) });
        const seen = await viaRequire.withSession((s) => viaImport.currentSession() === s).catch((e) => String(e));
        console.log(JSON.stringify({ same, seen, exports: Object.keys(viaImport).sort() }));
      });
    `;
    // The SQLite driver is borrowed from this repository rather than compiled again.
    const env = { ...process.env, NODE_PATH: join(root, "node_modules") };
    const out = JSON.parse(execFileSync(process.execPath, ["-e", script], { cwd: dir, encoding: "utf8", env })) as {
      same: boolean;
      seen: unknown;
      exports: string[];
    };
    expect(out.same).to.equal(true);
    expect(out.exports).to.include.members([
      "withSession",
      "withTransaction",
      "UsesSession",
      "Transactional",
      "InjectSession",
      "SessionError",
    ]);
    expect(out.seen).to.equal(true);
  });
});
