import { Inject } from "@nestjs/common";
import type { EntityTarget, ObjectLiteral } from "typeorm";

const byTarget = new WeakMap<object, symbol>();
const byName = new Map<string, symbol>();

/** The entity's name, for the token's description. */
function nameOf(entity: EntityTarget<ObjectLiteral>): string {
  if (typeof entity === "string") return entity;
  if (typeof entity === "function") return entity.name;
  const named = entity as { name?: unknown; options?: { name?: unknown } };
  const name = named.options?.name ?? named.name;
  return typeof name === "string" ? name : "entity";
}

/**
 * The injection token of the session repository of `entity`, the one that
 * {@link InjectSessionRepository} asks for and `SessionModule.forFeature()` provides.
 * Use it in custom providers and in tests (`overrideProvider`).
 *
 * @param entity - the entity class, schema or name
 * @returns a symbol, the same for the same entity every time
 * @throws TypeError when `entity` is not a class, an EntitySchema or a name
 * @example
 * ```ts
 * const moduleRef = await Test.createTestingModule({ imports: [AppModule] })
 *   .overrideProvider(getSessionRepositoryToken(Cat))
 *   .useValue(fakeCats)
 *   .compile();
 * ```
 */
export function getSessionRepositoryToken(entity: EntityTarget<ObjectLiteral>): symbol {
  if (typeof entity === "string") {
    let token = byName.get(entity);
    if (token === undefined) byName.set(entity, (token = Symbol(`SessionRepository<${entity}>`)));
    return token;
  }
  if ((typeof entity !== "function" && typeof entity !== "object") || entity === null) {
    throw new TypeError(
      `Expected an entity class, EntitySchema or entity name, got \`${String(entity)}\` (${typeof entity})`,
    );
  }
  let token = byTarget.get(entity);
  if (token === undefined) byTarget.set(entity, (token = Symbol(`SessionRepository<${nameOf(entity)}>`)));
  return token;
}

/**
 * Constructor parameter (or property) decorator: inject the session repository of
 * `entity`, the registry's scoped repository proxy (`registry.getRepository(entity)`).
 * Every call on it goes to the current scope's session: the request's, or the
 * transaction of the `@Transactional()` method that makes it. So a service that
 * uses it stays in the transaction, which a repository from `@InjectRepository()`
 * (bound to `dataSource.manager`) does not.
 *
 * The module that declares the provider imports `SessionModule.forFeature([entity])`.
 *
 * @param entity - the entity class, schema or name
 * @returns Nest's `@Inject()` decorator for {@link getSessionRepositoryToken}`(entity)`
 * @throws TypeError when `entity` is not a class, an EntitySchema or a name
 * @example
 * ```ts
 * @Injectable()
 * export class CatsService {
 *   constructor(@InjectSessionRepository(Cat) private readonly cats: Repository<Cat>) {}
 *
 *   @Transactional()
 *   async adopt(name: string): Promise<Cat> {
 *     return this.cats.save({ name });
 *   }
 * }
 *
 * @Module({ imports: [SessionModule.forFeature([Cat])], providers: [CatsService] })
 * export class CatsModule {}
 * ```
 */
export function InjectSessionRepository(entity: EntityTarget<ObjectLiteral>): ReturnType<typeof Inject> {
  return Inject(getSessionRepositoryToken(entity));
}
