import type { QueryRunner } from "typeorm";

/**
 * One statement at a time on a connection, in the order they were issued
 * (guarantee 10): node-postgres 8.19+ warns about a second `query()` while one is in
 * flight and pg 9 refuses it; node-sqlite3 runs statements handed to it together in
 * any order. A statement that finds the connection free runs at once; the others
 * wait their turn in a FIFO queue.
 */
export class StatementQueue {
  #busy = false;
  #waiting: (() => void)[] = [];

  /** Run `send` when every statement queued before it has been answered. */
  async run<T>(send: () => Promise<T>): Promise<T> {
    if (this.#busy) await new Promise<void>((turn) => this.#waiting.push(turn));
    else this.#busy = true;
    try {
      return await send();
    } finally {
      // Hand the connection straight to the next statement, or mark it free.
      const next = this.#waiting.shift();
      if (next === undefined) this.#busy = false;
      else next();
    }
  }
}

const queues = new WeakMap<QueryRunner, StatementQueue>();

/** The queue of the connection behind `runner` (SQLite's one shared runner has one for every session). */
export function queueOf(runner: QueryRunner): StatementQueue {
  let queue = queues.get(runner);
  if (queue === undefined) {
    queue = new StatementQueue();
    queues.set(runner, queue);
  }
  return queue;
}
