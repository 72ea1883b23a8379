import { PropagationError, TransactionNotActiveError } from "../../errors.js";
import { TransactionSql } from "./control.js";
import type { ConnectionGate } from "./gate.js";
import type { Handle, Level, LevelHandle, LevelOutcome, LevelSpec, LevelStack, SessionCallback } from "./levels.js";
import { type Frame, markWrote, storage } from "../scope.js";
import type { Session, SessionHost } from "./session.js";
import type { SessionState } from "./state.js";

/**
 * A session's transactions: opens a level for a block (BEGIN, or a SAVEPOINT when one
 * is open) or joins the open one, and ends it (COMMIT or RELEASE, ROLLBACK) exactly
 * once, whoever asks second.
 */
export class Transactions {
  readonly session: Session;
  readonly #host: SessionHost;
  readonly #state: SessionState;
  readonly #stack: LevelStack;
  readonly #gate: ConnectionGate;
  /** The BEGIN, COMMIT... statements themselves. */
  readonly sql: TransactionSql;
  /** The BEGIN or SAVEPOINT in flight, if any: closing waits for it. */
  starting: Promise<void> | undefined;

  constructor(session: Session, host: SessionHost, state: SessionState, stack: LevelStack, gate: ConnectionGate) {
    this.session = session;
    this.#host = host;
    this.#state = state;
    this.#stack = stack;
    this.#gate = gate;
    this.sql = new TransactionSql(session, host, gate, (error) => this.discard(error));
  }

  /**
   * Open a level for a block running in `frame`: a transaction, a savepoint, or a
   * join of the enclosing one (`savepoint: false`). Waits while another block of this
   * session owns the open transaction.
   */
  enter(frame: Frame | undefined, spec: LevelSpec): Promise<LevelHandle> {
    const state = this.#state;
    const reopening = state.reopening();
    if (reopening !== undefined) return reopening.then(() => this.enter(frame, spec));
    if (!state.usableFrom(frame)) return Promise.reject(state.closedError());
    if (state.mayRun(frame)) {
      try {
        return this.#start(this.#stack.push(frame, spec, this.session), spec);
      } catch (error) {
        return Promise.reject(error);
      }
    }
    return new Promise<LevelHandle>((resolve, reject) => {
      this.#state.wait(frame, () => {
        try {
          if (!state.usableFrom(frame)) throw state.closedError();
          resolve(this.#start(this.#stack.push(frame, spec, this.session), spec));
        } catch (error) {
          reject(error);
        }
      });
    });
  }

  /**
   * End what {@link enter} opened: commit (or release the savepoint) or roll back. A
   * join ends nothing. Never rejects: failures come back as `error`.
   */
  async exit(handle: LevelHandle, commit: boolean, failure?: unknown): Promise<LevelOutcome> {
    const { level, joined } = handle as Handle;
    if (joined) return { callbacks: [] };
    if (failure !== undefined) level.failure = failure;
    const state = this.#state;
    if (level.ended !== undefined || level.ending !== undefined) {
      // Ended, or being ended by the session closing: wait for that, never end it twice.
      await level.ending;
      if (commit && level.forced) {
        return { callbacks: [], error: state.closedError("its transaction was rolled back when it closed") };
      }
      return { callbacks: [] };
    }
    return state.asCloser(async () => {
      // Levels opened above this one and left open (a begin() without commit) are undone.
      const stack = this.#stack;
      const callbacks: SessionCallback[] = [];
      while (stack.size > 0 && stack.top !== level && level.ended === undefined) {
        callbacks.push(...(await this.end(stack.top!, false)).callbacks);
      }
      if (level.ended !== undefined) return { callbacks, error: state.closedError() };
      const outcome = await this.end(level, commit);
      return callbacks.length === 0 ? outcome : { ...outcome, callbacks: [...callbacks, ...outcome.callbacks] };
    });
  }

  /**
   * A block's body has resolved: run the `beforeCommit` callbacks of its level if its
   * COMMIT is the outermost one (to the code under test). They may add more.
   */
  async beforeCommit(handle: LevelHandle): Promise<void> {
    const { level, joined } = handle as Handle;
    if (joined) return;
    if (level.savepoint && this.#stack.below(level)?.invisible !== true) return;
    for (let next = level.beforeCommit?.shift(); next !== undefined; next = level.beforeCommit?.shift()) {
      await next();
    }
  }

  /**
   * The innermost level, if the caller may end it: a late continuation must not end
   * the transaction of the block that is committing, nor a sibling block's.
   */
  ownTop(action: string): Handle {
    const frame = storage.getStore();
    this.#state.assertUsable(frame);
    const top = this.#stack.top;
    if (top === undefined || !this.#state.mayRun(frame)) {
      throw new TransactionNotActiveError(String(this.session), action);
    }
    return { level: top, joined: false };
  }

  /** Send the BEGIN (taking the connection first) or the SAVEPOINT of a pushed level. */
  async #start(handle: Handle, spec: LevelSpec): Promise<Handle> {
    if (handle.joined) return handle;
    const { level } = handle;
    const gate = this.#gate;
    const real = gate.open();
    const lease = this.#host.lease;
    let held = false;
    try {
      if (!level.savepoint) {
        if (lease === undefined) {
          await gate.connect();
        } else {
          const waiting = gate.acquire(lease);
          held = waiting === undefined;
          if (waiting !== undefined) await waiting;
          held = true;
          // The shared runner's own transaction events (BeforeTransactionStart...) carry the
          // manager of the session that holds it alone until its COMMIT or ROLLBACK.
          Object.assign(real, { manager: gate.manager });
        }
      }
      // One BEGIN or SAVEPOINT at a time: a savepoint needs its transaction begun.
      while (this.starting !== undefined) await this.starting;
      // Closing or closed while waiting: nothing was begun, and nothing may be now.
      if (level.ended !== undefined || !this.#state.usableFrom(storage.getStore())) throw this.#state.closedError();
      if (level.savepoint && this.#stack.below(level)?.begun !== true) {
        throw new PropagationError(
          `${String(this.session)}: the transaction this savepoint belongs to failed to begin.`,
        );
      }
      // The span first, so that the BEGIN's own statement span nests under it.
      this.session._trace?.begin(level);
      const starting = (async () => {
        if (level.savepoint) await this.sql.call("startTransaction");
        else await this.sql.begin(spec.isolation, spec.readOnly, spec.invisible === true);
        level.begun = true;
      })();
      const settled = starting.catch(() => undefined);
      this.starting = settled;
      try {
        await starting;
      } finally {
        if (this.starting === settled) this.starting = undefined;
      }
    } catch (error) {
      this.session._trace?.end(level, false, error);
      if (level.ended === undefined) this.#stack.pop(level, "rolledBack");
      if (held) lease!.release(this.session);
      this.#state.wake();
      throw error;
    }
    this.#host.emit("begin", this.session, { savepoint: level.savepoint, attempt: level.attempt });
    return handle;
  }

  /**
   * End a level once: whoever comes second (the session closing while its block
   * commits, say) waits for the first and gets nothing to do.
   */
  end(level: Level, commit: boolean): Promise<LevelOutcome> {
    if (level.ending !== undefined) return level.ending.then(() => ({ callbacks: [] }));
    // Statements already let through reach the connection before the COMMIT or
    // ROLLBACK, so that none runs after it, outside the transaction it belonged to.
    const end = (): Promise<LevelOutcome> => (commit ? this.#commit(level) : this.#rollback(level));
    level.ending = this.#gate.inFlight.size === 0 ? end() : this.#gate.answered().then(end);
    return level.ending;
  }

  async #commit(level: Level): Promise<LevelOutcome> {
    if (level.rollbackOnly !== undefined) {
      const error = new PropagationError(
        `${String(this.session)} was rolled back instead of committed: the inner block "${level.rollbackOnly}" ` +
          `failed after joining this transaction with savepoint: false, and its error was caught. ` +
          `Let the error propagate, or give the inner block a savepoint (the default) to undo only its own work.`,
      );
      level.failure = error;
      return { callbacks: (await this.#rollback(level)).callbacks, error };
    }
    try {
      await this.sql.call("commitTransaction");
    } catch (error) {
      if (level.savepoint) {
        level.failure = error;
        return { callbacks: (await this.#rollback(level)).callbacks, error };
      }
      // A failed COMMIT leaves the connection in an unknown state: never reuse it.
      this.#stack.pop(level, "rolledBack");
      await this.discard(error);
      this.#ended(level, "rollback", { error, durationMs: since(level), attempt: level.attempt });
      return { callbacks: level.afterRollback ?? [], error };
    }
    this.#stack.pop(level, "committed");
    const parent = this.#stack.top;
    if (parent?.invisible === true) {
      // Outermost to the code under test: its callbacks run now (or are dropped on request).
      this.#ended(level, "commit", { savepoint: true, durationMs: since(level) });
      return { callbacks: parent.runAfterCommit ? (level.afterCommit ?? []) : [] };
    }
    if (level.savepoint && parent !== undefined) {
      if (level.afterCommit) (parent.afterCommit ??= []).push(...level.afterCommit);
      if (level.afterRollback) (parent.afterRollback ??= []).push(...level.afterRollback);
      if (level.beforeCommit) (parent.beforeCommit ??= []).push(...level.beforeCommit);
    } else {
      // With `replicas`: the scope has written on the primary, and reads its own writes from now on.
      if (this.#host.replicated && !level.readOnly && !this.session.replica) {
        markWrote(storage.getStore(), this.session.registry);
      }
      await this.#endOutermost(level);
    }
    this.#ended(level, "commit", { savepoint: level.savepoint, durationMs: since(level), attempt: level.attempt });
    return { callbacks: level.savepoint ? [] : (level.afterCommit ?? []) };
  }

  async #rollback(level: Level): Promise<LevelOutcome> {
    let failed = false;
    try {
      await this.sql.call("rollbackTransaction");
    } catch (error) {
      failed = true;
      this.#host.reportError(this.session, error);
      // Whether a ROLLBACK (TO SAVEPOINT) that failed undid anything is unknown,
      // and TypeORM's idea of the nesting no longer matches: never reuse it.
      this.#stack.pop(level, "rolledBack");
      await this.discard(error);
    }
    if (!failed) {
      this.#stack.pop(level, "rolledBack");
      if (!level.savepoint) await this.#endOutermost(level);
    }
    this.#ended(level, "rollback", { savepoint: level.savepoint, durationMs: since(level), attempt: level.attempt });
    return { callbacks: level.afterRollback ?? [] };
  }

  /** Emit the end of a level, end its span, and let waiting blocks run. */
  #ended(
    level: Level,
    event: "commit" | "rollback",
    payload: { error?: unknown; savepoint?: boolean; durationMs: number; attempt?: number | undefined },
  ): void {
    this.session._trace?.end(level, event === "commit", payload.error ?? level.failure);
    this.#host.emit(event, this.session, payload);
    this.#state.wake();
  }

  /** After the outermost COMMIT or ROLLBACK: undo per-transaction settings, give the lease back. */
  async #endOutermost(level: Level): Promise<void> {
    if (level.readOnly && this.#host.family === "sqlite") {
      try {
        await this.sql.readOnly(false);
      } catch (error) {
        this.#host.reportError(this.session, error);
      }
    }
    this.#host.lease?.release(this.session);
    this.#gate.releaseIfUnused();
  }

  /** The connection failed a COMMIT or ROLLBACK: discard it; this session is finished. */
  async discard(error: unknown): Promise<void> {
    const state = this.#state;
    if (state.broken !== undefined) return;
    state.broken = error ?? new Error("connection discarded");
    await this.#gate.discard(error);
    this.#stack.dropAll();
    state.abort();
    this.#state.wake();
  }
}

/** How long `level` has been open, in milliseconds. */
function since(level: Level): number {
  return performance.now() - level.startedAt;
}
