/**
 * A fair (FIFO) lease on one shared resource, such as the single connection that
 * TypeORM's SQLite drivers hand to every caller.
 *
 * The holder may take it again while it holds it (a count), so that the statements
 * of one session and its transaction nest without waiting on themselves.
 */
export class Lease<H extends object> {
  #holder: H | undefined;
  #count = 0;
  #queue: { holder: H; grant: () => void; refuse: (error: unknown) => void }[] = [];

  /** The current holder, if any. */
  get holder(): H | undefined {
    return this.#holder;
  }

  /**
   * Take the lease for `holder`. Returns `undefined` when granted at once (the
   * common case, kept synchronous), else a promise that resolves when granted, or
   * rejects if the wait is {@link cancel}led.
   */
  acquire(holder: H): Promise<void> | undefined {
    if (this.#holder === undefined || this.#holder === holder) {
      this.#holder = holder;
      this.#count += 1;
      return undefined;
    }
    return new Promise<void>((grant, refuse) => {
      this.#queue.push({ holder, grant, refuse });
    });
  }

  /** Give one hold back; the last one hands the lease to the next waiter. */
  release(holder: H): void {
    if (this.#holder !== holder) return;
    this.#count -= 1;
    if (this.#count > 0) return;
    const next = this.#queue[0];
    this.#holder = next?.holder;
    if (next === undefined) return;
    // Hand over to the first waiter together with all its other waiting holds.
    const granted = this.#queue.filter((w) => w.holder === next.holder);
    this.#queue = this.#queue.filter((w) => w.holder !== next.holder);
    this.#count = granted.length;
    for (const w of granted) w.grant();
  }

  /** Drop every hold of `holder` at once (a session that is being closed). */
  releaseAll(holder: H): void {
    if (this.#holder !== holder) return;
    this.#count = 1;
    this.release(holder);
  }

  /**
   * Stop the waits of `holder`: they reject with the error `reason` makes (made
   * only when someone waits: most calls find nobody).
   */
  cancel(holder: H, reason: () => unknown): void {
    if (this.#queue.length === 0) return;
    const cancelled = this.#queue.filter((w) => w.holder === holder);
    if (cancelled.length === 0) return;
    this.#queue = this.#queue.filter((w) => w.holder !== holder);
    const error = reason();
    for (const w of cancelled) w.refuse(error);
  }
}
