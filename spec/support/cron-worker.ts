/**
 * One instance of a distributed node-cron task, for the multi-process spec in
 * ../cron.spec.ts: run as `node cron-worker.js <postgres-url> <lease-table> <task-name>`.
 *
 * Once connected it prints `ready` and reads a deadline (epoch ms) from stdin; until then
 * it schedules the task every second with `distributed: true` and a
 * DatabaseRunCoordinator on the given database, and inserts each fire it runs into
 * `cron_runs` (key, pid). At the end it prints one JSON line: `{ pid, ran, skipped }`.
 */
import "reflect-metadata";
import { once } from "node:events";
import cron from "node-cron";
import { createSessionRegistry } from "../../src/index.js";
import { DatabaseRunCoordinator, sessionTask } from "../../src/integrations/cron.js";

const [url, table, name] = process.argv.slice(2);
if (url === undefined || table === undefined || name === undefined) {
  throw new Error("usage: cron-worker.js <postgres-url> <lease-table> <task-name>");
}

const db = createSessionRegistry({ url, name: `worker-${process.pid}`, extra: { max: 3 } });
await db.withSession((s) => s.query("SELECT 1"));
process.stdout.write("ready\n");
process.stdin.setEncoding("utf8");
const [line] = (await once(process.stdin, "data")) as [string];
const deadline = Number(line.trim());

const ran: string[] = [];
let skipped = 0;
const task = cron.schedule(
  "* * * * * *",
  sessionTask(
    async (s, context) => {
      const key = `${name}:${context.date.toISOString()}`;
      ran.push(key);
      await s.query("INSERT INTO cron_runs (key, pid) VALUES ($1, $2)", [key, process.pid]);
    },
    { registry: db },
  ),
  { name, distributed: true, runCoordinator: new DatabaseRunCoordinator({ registry: db, table }) },
);
task.on("execution:skipped", () => {
  skipped += 1;
});

await new Promise((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())));
await task.destroy();
// Let a fire that started just before the deadline (asking the coordinator, then running) finish.
await new Promise((resolve) => setTimeout(resolve, 500));
await db.drain({ timeoutMs: 5_000, destroy: true });
process.stdin.destroy();
process.stdout.write(`${JSON.stringify({ pid: process.pid, ran, skipped })}\n`);
