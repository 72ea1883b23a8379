import { PropagationError } from "../../errors.js";
import type { IsolationLevel } from "../block/options.js";
import { type Frame, isWithin } from "../scope.js";
import type { SpanLike } from "../tracing/otel.js";

/** A callback registered with `afterCommit`, `afterRollback` or `beforeCommit`. */
export type SessionCallback = () => unknown;

/** What a transactional block asks of the transaction it opens or joins. */
export interface LevelSpec {
  readonly isolation: IsolationLevel | undefined;
  readonly readOnly: boolean;
  readonly durable: boolean;
  readonly savepoint: boolean;
  readonly name: string | undefined;
  readonly attempt?: number | undefined;
  /** The transaction of useTransactionalTests(): invisible to the code under test. */
  readonly invisible?: boolean;
  /** With `invisible`: run `afterCommit` callbacks when a block's savepoint is released. */
  readonly runAfterCommit?: boolean;
}

/**
 * One open transaction or savepoint of a session. The frame that opened it owns
 * it: only work running inside that frame may use the session until it ends.
 */
export interface Level {
  readonly owner: Frame | undefined;
  readonly savepoint: boolean;
  readonly readOnly: boolean;
  readonly startedAt: number;
  afterCommit: SessionCallback[] | undefined;
  afterRollback: SessionCallback[] | undefined;
  beforeCommit: SessionCallback[] | undefined;
  /** Name of an inner block that failed inside this level with `savepoint: false`. */
  rollbackOnly: string | undefined;
  /** The BEGIN or SAVEPOINT has been executed (until then there is nothing to undo). */
  begun: boolean;
  /** Rolled back by the session closing or discarding its connection, not by its owner. */
  forced: boolean;
  /** The COMMIT or ROLLBACK under way, so that no one ends the level twice. */
  ending: Promise<LevelOutcome> | undefined;
  /** The outer transaction of useTransactionalTests(): blocks inside it behave as outermost. */
  readonly invisible: boolean;
  readonly runAfterCommit: boolean;
  /** The attempt (from 1) of a block run with `retry`, for the events. */
  readonly attempt: number | undefined;
  ended: "committed" | "rolledBack" | undefined;
  /** With `tracing`: the level's span, while it is open. */
  span: SpanLike | undefined;
  /** What made the block that owns the level fail, for its span. */
  failure: unknown;
}

/** What entering gives a block: the level it opened, or the one it joined. */
export interface Handle {
  readonly level: Level;
  readonly joined: boolean;
}

/** Opaque to blocks: pass it back to `_exit` and `_markRollbackOnly`. */
export type LevelHandle = object;

/** What a finished level leaves to do: callbacks to run and an error to throw. */
export interface LevelOutcome {
  readonly callbacks: SessionCallback[];
  readonly error?: unknown;
}

/**
 * A session's open transaction and savepoints, innermost last. It does no I/O: it
 * decides who may use the session (the frame that owns the innermost level) and
 * whether a block opens a level or joins the open one.
 */
export class LevelStack {
  readonly #levels: Level[] = [];

  /** How many levels are open. */
  get size(): number {
    return this.#levels.length;
  }

  /** The innermost level, if any. */
  get top(): Level | undefined {
    return this.#levels.at(-1);
  }

  /** Open levels the code under test can see (all of them, outside useTransactionalTests()). */
  get visible(): number {
    return this.#levels.length - (this.#levels[0]?.invisible === true ? 1 : 0);
  }

  /** The level just outside `level`. */
  below(level: Level): Level | undefined {
    return this.#levels[this.#levels.indexOf(level) - 1];
  }

  /** The innermost level that work from `frame` belongs to, if any. */
  levelOf(frame: Frame | undefined): Level | undefined {
    for (let i = this.#levels.length - 1; i >= 0; i--) {
      const level = this.#levels[i]!;
      if (level.owner === undefined || isWithin(frame, level.owner)) return level;
    }
    return undefined;
  }

  /** Whether no level owned by another block than `frame`'s is open. */
  allows(frame: Frame | undefined): boolean {
    const top = this.#levels.at(-1);
    return top === undefined || top.owner === undefined || isWithin(frame, top.owner);
  }

  /**
   * Push a level for a block running in `frame`, or decide to join the open one
   * (`savepoint: false`). Synchronous, so that nobody slips in between.
   *
   * @param session - the session, named in error messages
   * @throws {@link PropagationError} when the block's options contradict the open transaction
   */
  push(frame: Frame | undefined, spec: LevelSpec, session: { toString(): string }): Handle {
    const top = this.#levels.at(-1);
    // Under useTransactionalTests() a block that would be outermost behaves so: durable is
    // allowed, isolation and readOnly are ignored, and its transaction is a savepoint.
    if (top !== undefined && !top.invisible) {
      const who = spec.name === undefined ? "A nested transactional block" : `Block "${spec.name}"`;
      if (spec.durable) {
        throw new PropagationError(
          `${who} is durable but runs inside an open transaction of ${String(session)}. ` +
            `Call it outside any transaction, or use propagation "requiresNew".`,
        );
      }
      if (spec.isolation !== undefined) {
        throw new PropagationError(
          `${who} asks for isolation ${spec.isolation} but joins an open transaction of ${String(session)}, ` +
            `whose isolation is already set. Set isolation on the outermost block, or use propagation "requiresNew".`,
        );
      }
      if (spec.readOnly && !top.readOnly) {
        throw new PropagationError(
          `${who} asks for readOnly but joins a read-write transaction of ${String(session)}. ` +
            `Set readOnly on the outermost block, or use propagation "requiresNew".`,
        );
      }
      if (!spec.savepoint) return { level: top, joined: true };
    }
    const level: Level = {
      owner: frame,
      savepoint: top !== undefined,
      readOnly: top?.invisible === true ? false : (top?.readOnly ?? spec.readOnly),
      startedAt: performance.now(),
      begun: false,
      forced: false,
      ending: undefined,
      attempt: spec.attempt,
      invisible: spec.invisible === true,
      runAfterCommit: spec.runAfterCommit !== false,
      afterCommit: undefined,
      afterRollback: undefined,
      beforeCommit: undefined,
      rollbackOnly: undefined,
      ended: undefined,
      span: undefined,
      failure: undefined,
    };
    this.#levels.push(level);
    return { level, joined: false };
  }

  /** Take `level` off the stack as ended. */
  pop(level: Level, ended: "committed" | "rolledBack"): void {
    const index = this.#levels.indexOf(level);
    if (index !== -1) this.#levels.splice(index, 1);
    level.ended = ended;
  }

  /** The connection was discarded: every level is over, rolled back by force. */
  dropAll(): void {
    for (const level of this.#levels.splice(0)) {
      level.ended = "rolledBack";
      level.forced = true;
    }
  }
}
