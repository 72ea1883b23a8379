import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { expect } from "chai";
import { SQLITE_DRIVER } from "./support/sqlite.js";
import { manifest, packAndInstall, root, specifiers, type Packed } from "./support/packed.js";

/** The packed tarball, installed into a fresh project next to TypeORM, as a user gets it. */
describe("the published package", function () {
  this.timeout(600_000);
  let packed: Packed;
  let installed: string;

  before(async () => {
    packed = await packAndInstall();
    installed = join(packed.dir, "node_modules", "typeorm-scoped-session");
  });

  it("declares its peers, the framework, job-queue and tracing ones optional", () => {
    expect(Object.keys(manifest.peerDependencies).sort()).to.deep.equal([
      "@nestjs/common",
      "@nestjs/core",
      "@opentelemetry/api",
      "bullmq",
      "express",
      "fastify",
      "koa",
      "node-cron",
      "reflect-metadata",
      "typeorm",
    ]);
    const { peerDependenciesMeta } = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as {
      peerDependenciesMeta: Record<string, { optional?: boolean }>;
    };
    const optional = Object.keys(peerDependenciesMeta).filter((name) => peerDependenciesMeta[name]!.optional);
    expect(optional.sort()).to.deep.equal([
      "@nestjs/common",
      "@nestjs/core",
      "@opentelemetry/api",
      "bullmq",
      "express",
      "fastify",
      "koa",
      "node-cron",
    ]);
  });

  it("holds only what users need: the build, its types, its sources (for the maps), and the docs", () => {
    expect(packed.files).to.include.members([
      "package.json",
      "README.md",
      "LICENSE",
      "CHANGELOG.md",
      "dist/index.js",
      "dist/index.d.ts",
      "dist/cjs/index.js",
      "dist/cjs/index.d.ts",
      "dist/cjs/package.json",
      "src/index.ts",
    ]);
    const unexpected = packed.files.filter(
      (f) =>
        !/^(dist\/.*\.(js|d\.ts|js\.map|d\.ts\.map)|dist\/cjs\/package\.json|src\/.*\.ts|package\.json|README\.md|LICENSE|CHANGELOG\.md)$/.test(
          f,
        ),
    );
    expect(unexpected).to.deep.equal([]);
  });

  it("has source maps whose sources are in the tarball", () => {
    const maps = packed.files.filter((f) => f.endsWith(".map"));
    expect(maps.length).to.be.greaterThan(10);
    const missing = maps.flatMap((map) => {
      const { sources } = JSON.parse(readFileSync(join(installed, map), "utf8")) as { sources: string[] };
      return sources.map((source) => join(dirname(map), source)).filter((file) => !existsSync(join(installed, file)));
    });
    expect(missing).to.deep.equal([]);
  });

  it("describes every module subpath for node10 resolution (typesVersions) too", () => {
    const subpaths = Object.keys(manifest.exports).filter((s) => s !== "." && s !== "./package.json");
    expect(subpaths.length).to.be.greaterThan(3);
    for (const subpath of subpaths) {
      const types = manifest.typesVersions["*"]![subpath.slice(2)];
      expect(types, subpath).to.have.length(1);
      expect(existsSync(join(installed, types![0]!)), types![0]).to.equal(true);
    }
  });

  it("require() and import() give the same module instance, for every subpath", () => {
    const script = `
      (async () => {
        const result = {};
        for (const specifier of ${JSON.stringify(specifiers)}) {
          const viaRequire = require(specifier);
          const viaImport = await import(specifier);
          const names = Object.keys(viaRequire).filter((n) => n !== "__esModule").sort();
          const imported = Object.keys(viaImport).filter((n) => n !== "default").sort();
          const differing = names.filter((n) => viaRequire[n] !== viaImport[n]);
          result[specifier] = { names, imported, differing };
        }
        console.log(JSON.stringify(result));
      })().catch((e) => { console.error(e); process.exit(1); });
    `;
    const out = JSON.parse(
      execFileSync(process.execPath, ["-e", script], { cwd: packed.dir, encoding: "utf8" }),
    ) as Record<string, { names: string[]; imported: string[]; differing: string[] }>;
    expect(Object.keys(out)).to.deep.equal(specifiers);
    for (const [specifier, { names, imported, differing }] of Object.entries(out)) {
      expect(names, specifier).to.not.be.empty;
      expect(imported, specifier).to.deep.equal(names);
      expect(differing, specifier).to.deep.equal([]);
    }
    expect(out["typeorm-scoped-session"]!.names).to.include.members([
      "defaultRegistry",
      "withSession",
      "withTransaction",
      "UsesSession",
      "Transactional",
      "InjectSession",
      "SessionError",
    ]);
  });

  it("a scope opened through require() is seen through import(), from CommonJS and from an ES module", () => {
    const body = (load: string) => `
      ${load}
      const { DataSource } = require("typeorm");
      viaRequire.configureSessions({ dataSource: new DataSource({ type: ${JSON.stringify(SQLITE_DRIVER)}, database: ":memory:" }) });
      const seen = await viaRequire.withSession((s) => viaImport.currentSession() === s).catch((e) => String(e));
      const same = viaRequire.defaultRegistry === viaImport.defaultRegistry;
      await viaRequire.defaultRegistry.drain();
      console.log(JSON.stringify({ same, seen }));
    `;
    // The SQLite driver is borrowed from this repository rather than compiled again.
    const env = { ...process.env, NODE_PATH: join(root, "node_modules") };
    const commonJs = `(async () => { ${body(
      `const viaRequire = require("typeorm-scoped-session"); const viaImport = await import("typeorm-scoped-session");`,
    )} })().catch((e) => { console.error(e); process.exit(1); });`;
    const esm = `import { createRequire } from "node:module"; const require = createRequire(process.cwd() + "/index.js");
      import * as viaImport from "typeorm-scoped-session"; const viaRequire = require("typeorm-scoped-session");
      ${body("")}`;
    for (const [name, args] of [
      ["CommonJS", ["-e", commonJs]],
      ["ES module", ["--input-type=module", "-e", esm]],
    ] as const) {
      const out = execFileSync(process.execPath, args, { cwd: packed.dir, encoding: "utf8", env });
      expect(JSON.parse(out), name).to.deep.equal({ same: true, seen: true });
    }
  });
});
