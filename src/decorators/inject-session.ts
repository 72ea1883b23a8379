import { describe } from "../core/describe.js";

/** Parameter positions marked with `@InjectSession()`, per class (or prototype) and method. */
const injected = new WeakMap<object, Map<string | symbol, number>>();

/**
 * Fill this parameter with the method's session when the caller passes
 * `undefined`. Works with TypeScript's legacy decorators (`experimentalDecorators`),
 * where parameter decorators exist, on a method decorated with
 * {@link UsesSession} or {@link Transactional}. A caller that passes a session
 * explicitly wins.
 *
 * @returns a parameter decorator (legacy decorators only)
 * @throws TypeError when applied to anything but a method parameter
 * @example
 * ```ts
 * class InvoiceJob {
 *   @UsesSession()
 *   async run(id: number, @InjectSession() s?: Session) {
 *     return s!.getRepository(Invoice).findOneByOrFail({ id });
 *   }
 * }
 * ```
 */
export function InjectSession(): ParameterDecorator {
  return function injectSession(target: object, propertyKey: string | symbol | undefined, index: unknown): void {
    if (typeof index !== "number" || propertyKey === undefined) {
      throw new TypeError(
        `@InjectSession() decorates a method parameter, but was applied to ${propertyKey === undefined ? "a constructor parameter or a class member" : `${String(propertyKey)} (${describe(index)})`}`,
      );
    }
    let methods = injected.get(target);
    if (methods === undefined) injected.set(target, (methods = new Map<string | symbol, number>()));
    methods.set(propertyKey, index);
  };
}

/** @internal The parameter position `@InjectSession()` marked on this method, if any. */
export function injectedIndex(target: object, propertyKey: string | symbol): number | undefined {
  return injected.get(target)?.get(propertyKey);
}
