/**
 * One instance of a distributed node-cron task whose ticks take a while, for the
 * takeover and graceful-stop specs in ../cron-takeover.spec.ts: run as
 * `node cron-tick-worker.js <postgres-url> <lease-table> <task-name> <leaseMs|off> <workMs>`.
 *
 * Once connected it prints `ready`, then schedules the task every second with
 * `distributed: true` and a DatabaseRunCoordinator (`takeover: true, leaseMs` unless
 * `off`). Each tick inserts a `started` row into `cron_ticks` (key, pid, phase) and
 * prints `started <key>`, works for `workMs` (a timer), then inserts `finished` and
 * prints `finished <key>`. On SIGTERM it stops as the README recommends: stops the
 * task, drains the registry, and prints one JSON line `{ "drained": { waited, forced } }`.
 * node-cron logs to the console, so anything it logs shows on stderr.
 */
import "reflect-metadata";
import cron from "node-cron";
import { createSessionRegistry } from "../../src/index.js";
import { DatabaseRunCoordinator, sessionTask } from "../../src/integrations/cron.js";

const [url, table, name, lease, work] = process.argv.slice(2);
if (url === undefined || table === undefined || name === undefined || lease === undefined || work === undefined) {
  throw new Error("usage: cron-tick-worker.js <postgres-url> <lease-table> <task-name> <leaseMs|off> <workMs>");
}
const workMs = Number(work);

const db = createSessionRegistry({ url, name: `worker-${process.pid}`, extra: { max: 4 } });
await db.withSession((s) => s.query("SELECT 1"));

const coordinator =
  lease === "off"
    ? new DatabaseRunCoordinator({ registry: db, table })
    : new DatabaseRunCoordinator({ registry: db, table, takeover: true, leaseMs: Number(lease) });
const insert = "INSERT INTO cron_ticks (key, pid, phase) VALUES ($1, $2, $3)";
const task = cron.schedule(
  "* * * * * *",
  sessionTask(
    async (s, context) => {
      const key = `${name}:${context.date.toISOString()}`;
      await s.query(insert, [key, process.pid, "started"]);
      process.stdout.write(`started ${key}\n`);
      await new Promise((resolve) => setTimeout(resolve, workMs)); // the work
      await s.query(insert, [key, process.pid, "finished"]);
      process.stdout.write(`finished ${key}\n`);
    },
    { registry: db },
  ),
  { name, distributed: true, runCoordinator: coordinator },
);

process.once("SIGTERM", () => {
  void (async () => {
    await task.stop();
    const drained = await db.drain({ timeoutMs: 10_000, destroy: true });
    process.stdout.write(`${JSON.stringify({ drained })}\n`);
  })();
});
process.stdout.write("ready\n");
