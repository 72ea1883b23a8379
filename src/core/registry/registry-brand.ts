/**
 * The registries this copy of the library made: option validation asks here rather than
 * `instanceof SessionRegistry`, so that option-checks.ts does not import registry.ts (which
 * imports option-checks.ts through block.ts).
 */
const registries = new WeakSet<object>();

/** @internal Called once by every SessionRegistry's constructor. */
export function markRegistry(registry: object): void {
  registries.add(registry);
}

/** @internal Whether `value` is a SessionRegistry made by this copy of the library. */
export function isRegistry(value: unknown): boolean {
  return typeof value === "object" && value !== null && registries.has(value);
}
