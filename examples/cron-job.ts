/**
 * A node-cron job on typeorm-scoped-session, on embedded SQLite, no setup:
 * `node build/examples/cron-job.js` after `npm run build && npx tsc -p tsconfig.json`.
 *
 * Each tick runs in its own session and transaction (`sessionTask`), and the task is
 * `distributed`: a `DatabaseRunCoordinator` keeps one lease per fire in the same
 * database, so that however many instances of the app schedule it, each fire runs once.
 */
import "reflect-metadata";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import cron from "node-cron";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";
import { createSessionRegistry } from "typeorm-scoped-session";
import { DatabaseRunCoordinator, sessionTask } from "typeorm-scoped-session/cron";

@Entity("heartbeats")
class Heartbeat {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  firedAt!: string;
}

/** What {@link runCronJob} observed. */
export interface CronJobResult {
  /** The fire times (ISO) of the ticks that ran. */
  ticks: string[];
  /** The leases the coordinator took, one per fire: `name:ISO-time`. */
  leases: string[];
  /** Rows the ticks stored. */
  heartbeats: number;
}

/**
 * Schedule a task every second, let it run `ticks` times, stop it and report.
 *
 * @param ticks - how many ticks to wait for (default 2)
 * @param log - where to print progress (default: nowhere)
 */
export async function runCronJob(ticks = 2, log: (line: string) => void = () => undefined): Promise<CronJobResult> {
  const dir = mkdtempSync(join(tmpdir(), "cron-job-"));
  const db = createSessionRegistry({
    name: "cron-example",
    url: `sqlite:${join(dir, "app.db")}`,
    entities: [Heartbeat],
    synchronize: true,
  });
  db.on("commit", ({ session, durationMs }) =>
    log(`   [${String(session)}] commit after ${durationMs?.toFixed(1)} ms`),
  );

  const fired: string[] = [];
  const task = cron.schedule(
    "* * * * * *",
    sessionTask(
      async (s, { date }) => {
        const firedAt = date.toISOString();
        await s.getRepository(Heartbeat).save({ firedAt });
        fired.push(firedAt);
        log(`tick at ${firedAt}: stored a heartbeat`);
      },
      { registry: db, transaction: true },
    ),
    { name: "heartbeat", distributed: true, runCoordinator: new DatabaseRunCoordinator({ registry: db }) },
  );
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${ticks} ticks within ${ticks + 3} s`)), (ticks + 3) * 1000);
      task.on("execution:finished", () => {
        if (fired.length >= ticks) {
          clearTimeout(timer);
          resolve();
        }
      });
      task.on("execution:failed", (context) => {
        clearTimeout(timer);
        reject(context.execution?.error ?? new Error("tick failed"));
      });
    });
  } finally {
    await task.destroy();
  }
  const { leases, heartbeats } = await db.withSession(async (s) => ({
    leases: (await s.query<{ key: string }[]>(`SELECT "key" FROM scoped_session_cron_leases ORDER BY "key"`)).map(
      (r) => r.key,
    ),
    heartbeats: await s.getRepository(Heartbeat).count(),
  }));
  await db.drain({ destroy: true });
  rmSync(dir, { recursive: true, force: true });
  return { ticks: fired, leases, heartbeats };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const result = await runCronJob(2, console.log);
  console.log(`leases: ${result.leases.join(", ")}; heartbeats stored: ${result.heartbeats}`);
}
