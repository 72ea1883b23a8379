import type { DataSource, EntityManager, QueryRunner } from "typeorm";
import { applyDefaultBusyTimeout, type DriverFamily, familyOf, isSingleConnection } from "../driver/driver.js";
import type { SessionEvents } from "./events.js";
import { Lease } from "../driver/lease.js";
import { sessionManager } from "./manager.js";
import type { SessionPool } from "./pool.js";
import type { SessionRegistry } from "./registry.js";
import type { HostSettings } from "./registry-options.js";
import { Session, type SessionHost } from "../session/session.js";
import { Tracing } from "../tracing/session-trace.js";

/** @internal What blocks need of a registry besides what sessions need. */
export interface RegistryHost extends SessionHost {
  /**
   * A new session; throws {@link RegistryClosedError} while the registry drains, unless
   * `duringDrain` (bookkeeping that drain() waits for) and the DataSource is still initialized.
   * `replica`: on a replica (only where {@link replicated}).
   */
  createSession(name: string | undefined, duringDrain?: boolean, replica?: boolean): Session;
  /** A block ran past its timeoutMs. */
  timedOut(session: Session, durationMs: number): void;
  /** Throws {@link RegistryClosedError} once the registry has begun to drain. */
  assertOpen(): void;
  /** Whether the registry has begun to drain. */
  readonly draining: boolean;
}

/** Leases of single-connection DataSources, shared by every registry that uses one. */
const leases = new WeakMap<DataSource, Lease<Session> | null>();

/**
 * @internal A registry's side of the sessions of one initialized DataSource: made once
 * per DataSource the registry initializes (again after `configure()`), while the
 * registry's {@link SessionPool} and {@link SessionEvents} outlive it. A session keeps the
 * host it was created with, so a request session reopened after `configure()` stays on
 * its own DataSource.
 */
export class DataSourceHost implements RegistryHost {
  readonly dataSource: DataSource;
  readonly family: DriverFamily;
  readonly lease: Lease<Session> | undefined;
  readonly replicated: boolean;
  readonly #tracing: Tracing | undefined;
  readonly #registry: SessionRegistry;
  readonly #pool: SessionPool;
  readonly #events: SessionEvents;

  constructor(
    registry: SessionRegistry,
    pool: SessionPool,
    events: SessionEvents,
    dataSource: DataSource,
    settings: HostSettings,
  ) {
    let lease = leases.get(dataSource);
    if (lease === undefined) {
      lease = isSingleConnection(dataSource) ? new Lease<Session>() : null;
      leases.set(dataSource, lease);
    }
    applyDefaultBusyTimeout(dataSource);
    this.dataSource = dataSource;
    this.family = familyOf(dataSource);
    this.lease = lease ?? undefined;
    // TypeORM's drivers with `replication` in their options say so.
    this.replicated = settings.replicas && (dataSource.driver as { isReplicated?: boolean }).isReplicated === true;
    this.#tracing = Tracing.of(settings.tracing, dataSource);
    this.#registry = registry;
    this.#pool = pool;
    this.#events = events;
  }

  assertOpen(): void {
    this.#pool.assertOpen();
  }

  get draining(): boolean {
    return this.#pool.draining;
  }

  createSession(name: string | undefined, duringDrain = false, replica = false): Session {
    if (!duringDrain || !this.dataSource.isInitialized) this.#pool.assertOpen();
    const session = Session._create(this.#registry, this, name, replica);
    this.#trace(session);
    this.#pool.opened(session);
    return session;
  }

  reopened(session: Session): boolean {
    if (this.#pool.draining) return false;
    this.#trace(session);
    this.#pool.opened(session);
    return true;
  }

  /** With `tracing`: the session's span starts (a request session reopened gets a new one). */
  #trace(session: Session): void {
    if (this.#tracing !== undefined) session._trace = this.#tracing.start(session.id, session.name, session.replica);
  }

  timedOut(session: Session, durationMs: number): void {
    this.#pool.timedOut(session, durationMs);
  }

  emit(event: "connect" | "begin" | "commit" | "rollback" | "close", session: Session, extra?: object): void {
    // Sessions pass their events' details untyped: here they enter the typed emitter.
    const details = extra as { savepoint?: boolean } | undefined;
    if ((event === "commit" || event === "rollback") && !details?.savepoint) this.#pool.ended(event);
    this.#events.emit(event, session, ...([extra] as [never]));
  }

  manager(runner: QueryRunner, session: Session): EntityManager {
    return sessionManager(this.dataSource, runner, session);
  }

  reportError(session: Session, error: unknown): void {
    this.#events.emit("error", session, { error });
  }

  closed(session: Session, durationMs: number): void {
    // A request session may close, reopen and close again: each span counts its own statements.
    session._trace?.close(session.statements - session._counted);
    session._trace = undefined;
    this.#pool.closed(session, durationMs);
  }
}
