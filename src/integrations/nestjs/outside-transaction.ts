import type { DataSource, EntitySubscriberInterface, QueryRunner } from "typeorm";
import type { SessionRegistry } from "../../core/registry/registry.js";
import { OWNER, type Session } from "../../core/session/session.js";

/** The warning's code, for `process.on("warning")` filters. */
export const OUTSIDE_TRANSACTION = "TSS_OUTSIDE_TRANSACTION";

/**
 * A session's own transaction statements. On SQLite they run on the one shared runner
 * that `dataSource.manager` uses too, so the runner does not tell them apart.
 */
const CONTROL = /^\s*(?:BEGIN|START TRANSACTION|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|SET TRANSACTION)\b/i;

/** Call sites warned about, at most this many (then no more warnings). */
const MAX_SITES = 1000;

/** The session a runner belongs to: its view, or (pooled drivers) the driver's runner whose manager is the session's. */
function ownerOf(runner: QueryRunner | undefined): Session | undefined {
  if (runner === undefined) return undefined;
  const owned = runner as QueryRunner & { [OWNER]?: Session };
  return owned[OWNER] ?? (runner.manager as { [OWNER]?: Session } | undefined)?.[OWNER];
}

/**
 * Where this package's modules are (its `dist` folder), read from where this module
 * runs, so that the call site skips this package's frames however it is installed.
 */
const OWN_ROOT: string | undefined = (() => {
  const frame = new Error().stack?.split("\n")[1] ?? "";
  const at = frame.search(/[\\/]integrations[\\/]nestjs[\\/]/);
  return at === -1 ? undefined : frame.slice(0, at).replace(/^\s*at\s+(?:.*\()?(?:file:\/\/)?/, "");
})();

/** The first frame of the stack that is the application's: not TypeORM's, not this package's, not Node's. */
function callSite(): string | undefined {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 40;
  const stack = new Error().stack ?? "";
  Error.stackTraceLimit = limit;
  for (const line of stack.split("\n").slice(1)) {
    const frame = line.trim();
    if (!frame.startsWith("at ")) continue;
    if (/node_modules[\\/]typeorm[\\/]|node:internal|\(<anonymous>\)$|\(native\)$/.test(frame)) continue;
    if (OWN_ROOT !== undefined && frame.includes(OWN_ROOT)) continue;
    return frame.slice(3).replace(/^async /, "");
  }
  return undefined;
}

/**
 * Watch `dataSource` for statements that run outside the transaction of the current
 * scope's session of `registry` (through `dataSource.manager`, a repository from
 * `@InjectRepository()`, `dataSource.query()`): each call site gets one warning
 * (`process.emitWarning`, code {@link OUTSIDE_TRANSACTION}). Statements of any session
 * are not watched. Returns a function that stops watching.
 *
 * @internal
 */
export function watchOutsideTransaction(registry: SessionRegistry, dataSource: DataSource): () => void {
  const warned = new Set<string>();
  const subscriber: EntitySubscriberInterface = {
    beforeQuery(event) {
      if (ownerOf(event.queryRunner) !== undefined || warned.size >= MAX_SITES || CONTROL.test(event.query)) return;
      let session: Session | undefined;
      try {
        session = registry.tryCurrent();
      } catch {
        return; // the scope's session is closing: nothing to be outside of
      }
      if (session === undefined || !session.inTransaction) return;
      const site = callSite();
      const key = site ?? event.query;
      if (warned.has(key)) return;
      warned.add(key);
      const sql = event.query.length > 80 ? `${event.query.slice(0, 77)}...` : event.query;
      process.emitWarning(
        `A statement ran outside the transaction of ${String(session)} (registry "${registry.name}"): ` +
          `"${sql}"${site === undefined ? "" : ` at ${site}`}. It went through dataSource.manager (a repository ` +
          `from @InjectRepository() or dataSource.getRepository(), dataSource.query()), which is not part of ` +
          `the transaction: on PostgreSQL and MySQL it runs on a connection of its own and commits by itself ` +
          `(SQLite's one shared connection hides this). ` +
          `Use the session's repositories: @InjectSessionRepository(Entity) with ` +
          `SessionModule.forFeature([Entity]), registry.getRepository(Entity), or currentSession().manager.`,
        { code: OUTSIDE_TRANSACTION },
      );
    },
  };
  const subscribers = dataSource.subscribers;
  subscribers.push(subscriber);
  return () => {
    const index = subscribers.indexOf(subscriber);
    if (index !== -1) subscribers.splice(index, 1);
  };
}
