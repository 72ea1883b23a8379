import type { IncomingMessage, ServerResponse } from "node:http";
import {
  type DynamicModule,
  type FactoryProvider,
  Global,
  Inject,
  type MiddlewareConsumer,
  Module,
  type ModuleMetadata,
  type NestModule,
  type OnApplicationShutdown,
  type OnModuleInit,
} from "@nestjs/common";
import type { EntityTarget, ObjectLiteral } from "typeorm";
import { describe } from "../../core/describe.js";
import type { DrainOptions } from "../../core/registry/pool.js";
import { defaultRegistry, SessionRegistry } from "../../core/registry/registry.js";
import type { SessionRegistryOptions } from "../../core/registry/registry-options.js";
import { enterRequestScope } from "../http.js";
import { watchOutsideTransaction } from "./outside-transaction.js";
import { getSessionRepositoryToken } from "./repository.js";

/**
 * What `SessionModule` does besides giving the registry, whichever way it gets one.
 *
 * @example
 * ```ts
 * SessionModule.forRoot({ registry: db, drain: { timeoutMs: 5_000 }, warnOutsideTransaction: false });
 * ```
 */
export interface SessionModuleBehaviour {
  /**
   * How to drain the registry when the application shuts down (`app.close()`, or a
   * signal with `app.enableShutdownHooks()`): see `registry.drain()`. `false`: leave it
   * open. `destroy` defaults to `true` for a registry the module built from `url` (its
   * DataSource is the module's), `false` otherwise (the DataSource's owner, such as
   * `@nestjs/typeorm`, destroys it).
   * @default { timeoutMs: 10_000 }
   */
  drain?: DrainOptions | false;
  /**
   * Emit a warning (`process.emitWarning`, code `TSS_OUTSIDE_TRANSACTION`), once per
   * call site, when a statement runs outside the transaction of the current scope's
   * session: through `dataSource.manager`, a repository from `@InjectRepository()`,
   * or `dataSource.query()`, which take a connection of their own and commit by
   * themselves. The fix is `@InjectSessionRepository(Entity)`.
   * @default true unless `process.env.NODE_ENV` is `"production"`
   */
  warnOutsideTransaction?: boolean;
}

/**
 * Use this registry (`createSessionRegistry(...)`) rather than `defaultRegistry`.
 * Decorated methods then name it: `@Transactional({ registry: db })`.
 *
 * @example
 * ```ts
 * export const db = createSessionRegistry({ url: process.env.DATABASE_URL!, entities: [Cat], name: "main" });
 *
 * @Module({ imports: [SessionModule.forRoot({ registry: db })] })
 * export class AppModule {}
 * ```
 */
export interface SessionModuleRegistryOptions extends SessionModuleBehaviour {
  /** The registry whose scope each request runs in, injectable as `SessionRegistry`. */
  registry: SessionRegistry;
}

/**
 * Options of `SessionModule.forRoot()` (and what the factory of `forRootAsync()`
 * returns): registry options (`dataSource`, `url`, ...), which configure
 * `defaultRegistry` so that bare `@Transactional()` works; or `{ registry }`, which
 * uses that registry. Either way with the module's own options.
 *
 * @example
 * ```ts
 * const options: SessionModuleOptions = { url: "postgres://app@localhost/app", entities: [Cat], drain: { timeoutMs: 5_000 } };
 * ```
 */
export type SessionModuleOptions = (SessionRegistryOptions & SessionModuleBehaviour) | SessionModuleRegistryOptions;

/**
 * Options of `SessionModule.forRootAsync()`: a factory of {@link SessionModuleOptions} and what it needs.
 *
 * @example
 * ```ts
 * SessionModule.forRootAsync({
 *   imports: [ConfigModule],
 *   inject: [ConfigService],
 *   useFactory: (config: ConfigService) => ({ url: config.getOrThrow<string>("DATABASE_URL"), entities: [Cat] }),
 * });
 * ```
 */
export interface SessionModuleAsyncOptions {
  /** Modules that export what `inject` names (global modules, such as `TypeOrmModule`'s, need not be listed). */
  imports?: ModuleMetadata["imports"];
  /** What the factory gets, in order: `DataSource` from `@nestjs/typeorm`, `ConfigService`, ... */
  inject?: FactoryProvider["inject"];
  /** Returns the options, or a promise of them. */
  useFactory: (...args: never[]) => SessionModuleOptions | Promise<SessionModuleOptions>;
}

/** The options as the module was given them, once resolved. */
const OPTIONS = Symbol("SessionModuleOptions");

const BEHAVIOUR_KEYS = new Set(["drain", "warnOutsideTransaction"]);

/** The registry the options name, configuring `defaultRegistry` with registry options. */
function registryOf(options: SessionModuleOptions): SessionRegistry {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`Expected the options of SessionModule to be an object, got ${describe(options)}`);
  }
  if ("registry" in options && options.registry !== undefined) {
    if (!(options.registry instanceof SessionRegistry)) {
      throw new TypeError(
        `Expected \`registry\` to be a SessionRegistry (from createSessionRegistry()), got ${describe(options.registry)}`,
      );
    }
    return options.registry;
  }
  const registryOptions = Object.fromEntries(Object.entries(options).filter(([key]) => !BEHAVIOUR_KEYS.has(key)));
  defaultRegistry.configure(registryOptions);
  return defaultRegistry;
}

/**
 * NestJS module: the session registry for the whole application. It makes the
 * registry injectable under the `SessionRegistry` class token, runs every HTTP
 * request in a scope of its own (on the Express and the Fastify platforms: the
 * session is created on first use and closed once the request is over and nothing
 * of it runs), lets `@UsesSession`/`@Transactional` work on providers, and drains
 * the registry on application shutdown. The module is global: import it once, in
 * the root module.
 *
 * At start-up (`onModuleInit`) it initializes the registry's DataSource if needed
 * (`registry.ready()`), so that a database that cannot be reached fails the
 * start-up. Services get session repositories with
 * {@link InjectSessionRepository} (declared by {@link SessionModule.forFeature}).
 *
 * Only HTTP requests get a scope: in microservice handlers, gateways and scheduled
 * jobs, use `@UsesSession()`/`@Transactional()` on the method (or `withSession`).
 *
 * @example
 * ```ts
 * @Module({
 *   imports: [
 *     TypeOrmModule.forRoot({ type: "postgres", url: process.env.DATABASE_URL, entities: [Cat] }),
 *     SessionModule.forRootAsync({ useFactory: (ds: DataSource) => ({ dataSource: ds }), inject: [DataSource] }),
 *     CatsModule,
 *   ],
 * })
 * export class AppModule {}
 * ```
 */
export class SessionModule implements NestModule, OnModuleInit, OnApplicationShutdown {
  readonly #registry: SessionRegistry;
  readonly #options: SessionModuleOptions;
  #unwatch: (() => void) | undefined;

  /** @hidden Created by Nest. */
  constructor(registry: SessionRegistry, options: SessionModuleOptions) {
    this.#registry = registry;
    this.#options = options;
  }

  /**
   * The module with these options, known when the application module is declared.
   *
   * @param options - registry options (`dataSource`, `url`, ...) for `defaultRegistry`, or `{ registry }`;
   *   plus `drain` and `warnOutsideTransaction`
   * @returns the dynamic module, for `imports`
   * @throws TypeError/RangeError (when the application starts) on invalid options
   * @throws RegistryBusyError (when the application starts) when `defaultRegistry` has sessions open
   * @example
   * ```ts
   * @Module({ imports: [SessionModule.forRoot({ url: "sqlite:./app.db", entities: [Cat], synchronize: true })] })
   * export class AppModule {}
   * ```
   */
  static forRoot(options: SessionModuleOptions): DynamicModule {
    return SessionModule.forRootAsync({ useFactory: () => options });
  }

  /**
   * The module with options made at start-up, by a factory that gets providers:
   * `@nestjs/typeorm`'s `DataSource`, a `ConfigService`...
   *
   * @param options - `useFactory`, and `inject`/`imports` for what it needs
   * @returns the dynamic module, for `imports`
   * @throws TypeError/RangeError (when the application starts) on invalid options
   * @example
   * ```ts
   * SessionModule.forRootAsync({
   *   useFactory: (ds: DataSource) => ({ dataSource: ds }),
   *   inject: [DataSource],
   * });
   * ```
   */
  static forRootAsync(options: SessionModuleAsyncOptions): DynamicModule {
    if (typeof options !== "object" || options === null || typeof options.useFactory !== "function") {
      throw new TypeError(
        `Expected the options of SessionModule.forRootAsync() to be an object with a \`useFactory\` function, got ${describe(options)}`,
      );
    }
    return {
      module: SessionModule,
      global: true,
      imports: options.imports ?? [],
      providers: [
        {
          provide: OPTIONS,
          useFactory: options.useFactory as (...args: unknown[]) => unknown,
          inject: options.inject ?? [],
        },
        { provide: SessionRegistry, useFactory: registryOf, inject: [OPTIONS] },
      ],
      exports: [SessionRegistry],
    };
  }

  /**
   * Providers of session repositories for `entities`, which
   * {@link InjectSessionRepository} injects: each is the registry's scoped
   * repository proxy (`registry.getRepository(entity)`), so every call goes to the
   * current scope's session. Import it in the module that declares the providers.
   *
   * @param entities - entity classes, schemas or names
   * @returns the dynamic module, for `imports`
   * @throws TypeError when an entity is not a class, an EntitySchema or a name
   * @example
   * ```ts
   * @Module({ imports: [SessionModule.forFeature([Cat, Owner])], providers: [CatsService] })
   * export class CatsModule {}
   * ```
   */
  static forFeature(entities: readonly EntityTarget<ObjectLiteral>[]): DynamicModule {
    if (!Array.isArray(entities)) {
      throw new TypeError(`Expected SessionModule.forFeature() to get an array of entities, got ${describe(entities)}`);
    }
    // Array.isArray narrows a readonly array to `any[]`: name the element type again.
    const providers = entities.map((entity: EntityTarget<ObjectLiteral>) => ({
      provide: getSessionRepositoryToken(entity),
      useFactory: (registry: SessionRegistry) => registry.getRepository(entity),
      inject: [SessionRegistry],
    }));
    return { module: SessionFeatureModule, providers, exports: providers.map((p) => p.provide) };
  }

  /**
   * @hidden Nest's middleware hook: every route, on either platform (Nest runs it on
   * Node's request and response).
   */
  configure(consumer: MiddlewareConsumer): void {
    const registry = this.#registry;
    const middleware = (req: IncomingMessage, res: ServerResponse, next: (error?: unknown) => void): void =>
      enterRequestScope(registry, req, res, next);
    Object.defineProperty(middleware, "name", { value: "sessionScope" });
    consumer.apply(middleware).forRoutes("*");
  }

  /** @hidden Initialize the DataSource; watch it for statements outside the transaction. */
  async onModuleInit(): Promise<void> {
    await this.#registry.ready();
    const { warnOutsideTransaction = process.env.NODE_ENV !== "production" } = this.#options;
    if (warnOutsideTransaction && this.#registry.dataSource !== undefined) {
      this.#unwatch = watchOutsideTransaction(this.#registry, this.#registry.dataSource);
    }
  }

  /** @hidden Drain the registry. */
  async onApplicationShutdown(): Promise<void> {
    this.#unwatch?.();
    this.#unwatch = undefined;
    const { drain = {} } = this.#options;
    if (drain === false) return;
    const ownsDataSource = !("registry" in this.#options) && "url" in this.#options && this.#options.url !== undefined;
    await this.#registry.drain({ timeoutMs: 10_000, destroy: ownsDataSource, ...drain });
  }
}

/** The module of `SessionModule.forFeature()`: session repository providers only. */
class SessionFeatureModule {}

Inject(SessionRegistry)(SessionModule, undefined, 0);
Inject(OPTIONS)(SessionModule, undefined, 1);
Module({})(SessionModule);
Global()(SessionModule);
Module({})(SessionFeatureModule);
