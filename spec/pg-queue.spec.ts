// Guarantee 10 on node-postgres: statements issued together in one session reach the
// connection one at a time, so pg's DeprecationWarning (an error in pg 9) never fires.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { expect } from "chai";
import { DataSource } from "typeorm";
import { within } from "./support/http.js";
import { freshDatabase, pgServer } from "./support/postgres-hooks.js";
import { ENTITIES } from "./support/sqlite.js";

const SCRIPT = fileURLToPath(new URL("./support/pg-promise-all.js", import.meta.url));

/** Run the script with --throw-deprecation; resolves to its exit code and stderr. */
function run(url: string, mode: string): Promise<{ code: number | null; stderr: string }> {
  return within(
    new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ["--throw-deprecation", SCRIPT, url, mode], {
        stdio: ["ignore", "ignore", "pipe"],
      });
      let stderr = "";
      child.stderr.setEncoding("utf8");
      child.stderr.on("data", (chunk: string) => (stderr += chunk));
      child.on("error", reject);
      child.on("close", (code) => resolve({ code, stderr }));
    }),
    `node ${mode}`,
    30_000,
  );
}

describe("pg: Promise.all of statements in one session under --throw-deprecation [postgres]", () => {
  let url: string;
  let observer: DataSource;
  before(async function () {
    if (pgServer() === undefined) this.skip();
    url = await freshDatabase("promise_all");
    observer = new DataSource({ type: "postgres", url, entities: ENTITIES, synchronize: true });
    await observer.initialize();
  });
  after(async () => {
    if (observer?.isInitialized) await observer.destroy();
  });

  for (const mode of ["transaction", "session"]) {
    it(`in a ${mode === "transaction" ? "withTransaction" : "withSession (no transaction)"}: exit code 0, no DeprecationWarning`, async () => {
      const { code, stderr } = await run(url, mode);
      expect(stderr).to.not.include("DeprecationWarning");
      expect(code, stderr).to.equal(0);
      const rows = await observer.query<{ body: string }[]>("SELECT body FROM notes WHERE body LIKE $1 ORDER BY body", [
        `${mode} %`,
      ]);
      expect(rows.map((r) => r.body)).to.deep.equal([`${mode} a`, `${mode} b`]);
    });
  }

  it("the same statements on TypeORM's runner around the session fail there: the check can fail", async () => {
    const { code, stderr } = await run(url, "bypass");
    expect(stderr).to.include("DeprecationWarning");
    expect(code).to.not.equal(0);
  });
});
