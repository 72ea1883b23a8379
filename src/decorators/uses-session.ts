import { execute } from "../core/block/block.js";
import { type SessionOptions } from "../core/block/options.js";
import { describe } from "../core/describe.js";
import { resolveOptions, type ResolvedOptions } from "../core/block/option-checks.js";
import { defaultRegistry } from "../core/registry/registry.js";
import type { Session } from "../core/session/session.js";
import { injectedIndex } from "./inject-session.js";

// Decorators receive arbitrary method and constructor signatures: the public overloads below
// constrain with `any[]` parameters, since a method's own parameter types (`id: number`) are not
// assignable to `unknown` ones under strictFunctionTypes. Inside this module a method is only
// passed on and applied, so it is seen with `unknown`s.
type AnyMethod = (this: unknown, ...args: unknown[]) => unknown;
type AsyncMethod = (this: any, ...args: any[]) => PromiseLike<unknown>;
type AnyClass = abstract new (...args: any[]) => unknown;

/**
 * What {@link UsesSession} and {@link Transactional} return: a decorator for
 * methods that return a promise (a method that does not is a compile error), or
 * for a class (every own `async` method), under standard (TC39) decorators and
 * under TypeScript's legacy `experimentalDecorators` alike.
 */
export interface SessionDecorator {
  /** Standard decorators, on a method. */
  <This, Args extends any[], Return extends PromiseLike<unknown>>(
    method: (this: This, ...args: Args) => Return,
    context: ClassMethodDecoratorContext<This, (this: This, ...args: Args) => Return>,
  ): (this: This, ...args: Args) => Return;
  /** Standard decorators, on a class. */
  <C extends AnyClass>(value: C, context: ClassDecoratorContext<C>): void;
  /** Legacy decorators, on a method. */
  <T extends AsyncMethod>(
    target: object,
    propertyKey: string | symbol,
    descriptor: TypedPropertyDescriptor<T>,
  ): TypedPropertyDescriptor<T>;
  /** Legacy decorators, on a class. */
  <C extends AnyClass>(constructor: C): void;
}

const AsyncFunction = (Object.getPrototypeOf(async function () {}) as { constructor: FunctionConstructor }).constructor;

/** The functions this module made, so that a class-level decorator does not wrap them again. */
const wrappers = new WeakSet<AnyMethod>();

/**
 * Run every call of the method in {@link withSession} (the same core path, the
 * same options and guarantees): code inside it, however deep, finds the session
 * with {@link currentSession}. On a class, wraps each of its own `async` methods
 * (static ones too) that is not decorated already.
 *
 * Works with standard (TC39) decorators and with TypeScript's legacy
 * `experimentalDecorators`, detected at run time. Keeps `this`, the arguments,
 * the return value, the method's `name`, and the reflect-metadata other decorators
 * stored on it. `name` defaults to `Class.method`.
 *
 * @param options - block options (see {@link SessionOptions}); validated when the decorator is applied
 * @returns the decorator, for a method that returns a promise or for a class
 * @throws TypeError/RangeError for invalid options, or when applied to a field, accessor or parameter
 * @throws (as a rejection of each call) the errors {@link withSession} rejects with, and the method's own
 * @example
 * ```ts
 * class NightlyReport {
 *   @UsesSession()
 *   async run() {
 *     await currentSession().query("REFRESH MATERIALIZED VIEW daily_totals");
 *   }
 * }
 * ```
 */
export function UsesSession(options?: SessionOptions): SessionDecorator {
  return sessionDecorator(options, false);
}

/**
 * {@link UsesSession} with `transaction: true`: each call runs in a transaction
 * (a savepoint when nested in one) that commits when the method resolves and
 * rolls back when it throws.
 *
 * @param options - block options (see {@link SessionOptions}); validated when the decorator is applied
 * @returns the decorator, for a method that returns a promise or for a class
 * @throws TypeError/RangeError for invalid options, or when applied to a field, accessor or parameter
 * @throws (as a rejection of each call) the errors {@link withTransaction} rejects with, and the method's own
 * @example
 * ```ts
 * class Billing {
 *   @Transactional({ isolation: "SERIALIZABLE" })
 *   async settle(invoiceId: number) {
 *     const invoices = currentSession().getRepository(Invoice);
 *     await invoices.update(invoiceId, { settled: true });
 *   }
 * }
 * ```
 */
export function Transactional(options?: SessionOptions): SessionDecorator {
  return sessionDecorator(options, true);
}

function sessionDecorator(options: SessionOptions | undefined, transactional: boolean): SessionDecorator {
  // Validated now, so that a mistake shows when the class is defined, not at the first call.
  const base = resolveOptions(options, undefined, transactional);
  const decorator = (target: unknown, key: unknown, descriptor?: unknown): unknown => {
    const what = transactional ? "@Transactional()" : "@UsesSession()";
    if (isStandardContext(key)) {
      // Standard decorators: (value, context).
      if (key.kind === "method") {
        return wrap(target as AnyMethod, key.name, base, undefined);
      }
      if (key.kind === "class") {
        wrapClass(target as AnyClass, base);
        return undefined;
      }
      throw new TypeError(
        `${what} decorates methods and classes, but was applied to a ${key.kind} (${String(key.name)})`,
      );
    }
    // Legacy decorators: (constructor) or (prototype or constructor, key, descriptor).
    if (key === undefined && typeof target === "function") {
      wrapClass(target as AnyClass, base);
      return undefined;
    }
    const member = String(key);
    if (typeof descriptor === "number") {
      throw new TypeError(`${what} decorates methods and classes, but was applied to a parameter of ${member}`);
    }
    const d = descriptor as PropertyDescriptor | undefined;
    if (d === undefined) {
      throw new TypeError(`${what} decorates methods and classes, but was applied to the field ${member}`);
    }
    if (d.get !== undefined || d.set !== undefined) {
      throw new TypeError(`${what} decorates methods and classes, but was applied to the accessor ${member}`);
    }
    if (typeof d.value !== "function") {
      throw new TypeError(`${what} decorates methods, but ${member} is ${describe(d.value)}`);
    }
    d.value = wrap(
      d.value as AnyMethod,
      key as string | symbol,
      base,
      injectedIndex(target as object, key as string | symbol),
    );
    return d;
  };
  return decorator as SessionDecorator;
}

function isStandardContext(value: unknown): value is { kind: string; name: string | symbol | undefined } {
  return typeof value === "object" && value !== null && "kind" in value;
}

/** Class-level: wrap each own async method (instance and static) that is not wrapped yet. */
function wrapClass(target: AnyClass, base: ResolvedOptions): void {
  for (const holder of [target.prototype as object, target]) {
    for (const key of Reflect.ownKeys(holder)) {
      if (key === "constructor") continue;
      const d = Object.getOwnPropertyDescriptor(holder, key);
      const method = d?.value as unknown;
      if (typeof method !== "function" || !(method instanceof AsyncFunction) || wrappers.has(method as AnyMethod))
        continue;
      Object.defineProperty(holder, key, {
        ...d,
        value: wrap(method as AnyMethod, key, base, injectedIndex(holder, key)),
      });
    }
  }
}

/**
 * The one wrapper of both decorator conventions: each call is a block on the core
 * path, with the options resolved once and the label `Class.method`.
 */
function wrap(
  original: AnyMethod,
  key: string | symbol | undefined,
  base: ResolvedOptions,
  inject: number | undefined,
): AnyMethod {
  const method = String(key ?? original.name);
  let opts: ResolvedOptions | undefined = base.name === undefined ? undefined : base;
  const wrapped = function (this: unknown, ...args: unknown[]): Promise<unknown> {
    // The declaring class is known only once there is a `this` to look it up from.
    opts ??= { ...base, name: `${declaringClass(this, wrapped)}.${method}` };
    return execute(
      base.registry ?? defaultRegistry,
      (session: Session) => {
        if (inject !== undefined && args[inject] === undefined) args[inject] = session;
        return original.apply(this, args);
      },
      opts,
    );
  };
  copyIdentity(original, wrapped);
  wrappers.add(wrapped);
  return wrapped;
}

/** The name of the class that declares `method`, looked up from the receiver of a call. */
function declaringClass(receiver: unknown, method: AnyMethod): string {
  if (receiver === null || receiver === undefined) return "<unbound>";
  const isClass = typeof receiver === "function";
  for (
    let holder: object | null = isClass ? receiver : (Object.getPrototypeOf(receiver) as object | null);
    holder !== null;
    holder = Object.getPrototypeOf(holder) as object | null
  ) {
    for (const key of Reflect.ownKeys(holder)) {
      if (Object.getOwnPropertyDescriptor(holder, key)?.value === method) {
        return isClass ? (holder as AnyMethod).name : (holder.constructor as AnyMethod).name;
      }
    }
  }
  return isClass ? (receiver as AnyMethod).name : (receiver.constructor as AnyMethod).name;
}

/**
 * Keep what identifies the method: its `name` and `length`, properties frameworks
 * set on the function, and reflect-metadata other decorators stored on it (those
 * applied below this one; those above store theirs on the wrapper directly).
 */
function copyIdentity(original: AnyMethod, wrapped: AnyMethod): void {
  for (const key of Reflect.ownKeys(original)) {
    if (key === "prototype" || key === "arguments" || key === "caller") continue;
    const d = Object.getOwnPropertyDescriptor(original, key);
    if (d !== undefined) Object.defineProperty(wrapped, key, d);
  }
  const metadata = Reflect as unknown as {
    getOwnMetadataKeys?: (target: object) => unknown[];
    getOwnMetadata?: (key: unknown, target: object) => unknown;
    defineMetadata?: (key: unknown, value: unknown, target: object) => void;
  };
  if (typeof metadata.getOwnMetadataKeys !== "function") return;
  for (const key of metadata.getOwnMetadataKeys(original)) {
    metadata.defineMetadata!(key, metadata.getOwnMetadata!(key, original), wrapped);
  }
}
