// Lets `npm run demo` and `npm test` work straight after cloning: installs the
// locked dependencies (npm ci) when they are not there yet.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";

if (!existsSync(new URL("../node_modules/.package-lock.json", import.meta.url))) {
  console.log("Installing dependencies (npm ci; the sqlite3 driver compiles, about a minute)...");
  const npm = process.platform === "win32" ? "npm.cmd" : "npm";
  const { status } = spawnSync(npm, ["ci"], { stdio: "inherit" });
  if (status !== 0) process.exit(status ?? 1);
}
