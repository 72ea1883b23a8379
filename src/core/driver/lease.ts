/**
 * A fair (FIFO) lease on one shared resource, such as the single connection that
 * TypeORM's SQLite drivers hand to every caller.
 *
 * It is held either by one holder alone (a transaction: nobody else's statement may
 * run inside it) or, for single statements outside any transaction, by any number of
 * holders at once, so that such statements pipeline on the connection. The holder
 * alone may take it again while it holds it (a count), so that the statements of one
 * session and its transaction nest without waiting on themselves. Nobody overtakes a
 * waiter: while one waits, later holds queue behind it.
 */
export class Lease<H extends object> {
  #holder: H | undefined;
  #count = 0;
  /** Statement holds taken alongside others, per holder, while nobody holds the lease alone. */
  readonly #shared = new Map<H, number>();
  #queue: { holder: H; shared: boolean; grant: () => void; refuse: (error: unknown) => void }[] = [];

  /** The holder that holds the lease alone, if any. */
  get holder(): H | undefined {
    return this.#holder;
  }

  /**
   * Take the lease for `holder`: alone, or with `shared` alongside other statement
   * holds (a holder that already holds it alone takes it again instead). Returns
   * `undefined` when granted at once (the common case, kept synchronous), else a
   * promise that resolves when granted, or rejects if the wait is {@link cancel}led.
   */
  acquire(holder: H, shared = false): Promise<void> | undefined {
    if (this.#holder === holder) {
      this.#count += 1;
      return undefined;
    }
    if (this.#holder === undefined && this.#queue.length === 0) {
      if (shared) {
        this.#shareWith(holder);
        return undefined;
      }
      if (this.#shared.size === 0) {
        this.#holder = holder;
        this.#count = 1;
        return undefined;
      }
    }
    return new Promise<void>((grant, refuse) => {
      this.#queue.push({ holder, shared, grant, refuse });
    });
  }

  /**
   * Give one hold of `holder` back (its hold alone, or one of its statement holds);
   * the last one lets the next waiters in. A holder that holds nothing gives nothing
   * back (a statement that ends after its session dropped the lease).
   */
  release(holder: H): void {
    if (this.#holder === holder) {
      this.#count -= 1;
      if (this.#count > 0) return;
      this.#holder = undefined;
    } else {
      const holds = this.#shared.get(holder);
      if (holds === undefined) return;
      if (holds > 1) {
        this.#shared.set(holder, holds - 1);
        return;
      }
      this.#shared.delete(holder);
      if (this.#shared.size > 0) return;
    }
    this.#grantNext();
  }

  /**
   * Drop every hold of the holder that holds the lease alone (a session that is being
   * closed). Statement holds stay until their statements end.
   */
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
    this.#grantNext();
  }

  /** Let in, in order, the waiters that may hold the lease now. */
  #grantNext(): void {
    while (this.#holder === undefined && this.#queue.length > 0) {
      const next = this.#queue[0]!;
      if (next.shared) {
        this.#queue.shift();
        this.#shareWith(next.holder);
        next.grant();
        continue;
      }
      if (this.#shared.size > 0) return;
      // Alone, together with all the holder's other waiting holds.
      const granted = this.#queue.filter((w) => w.holder === next.holder);
      this.#queue = this.#queue.filter((w) => w.holder !== next.holder);
      this.#holder = next.holder;
      this.#count = granted.length;
      for (const w of granted) w.grant();
    }
  }

  #shareWith(holder: H): void {
    this.#shared.set(holder, (this.#shared.get(holder) ?? 0) + 1);
  }
}
