// Type tests, compiled in both decorator modes: each `@ts-expect-error` must meet an
// error, or the compilation fails ("Unused '@ts-expect-error' directive").
import { Transactional, UsesSession } from "../../src/index.js";

export class Accepted {
  @UsesSession()
  async plain(): Promise<void> {}

  @Transactional({ isolation: "SERIALIZABLE" })
  async withArgs(id: number, label: string): Promise<string> {
    return `${id} ${label}`;
  }

  @UsesSession()
  thenable(): PromiseLike<number> {
    return Promise.resolve(1);
  }

  @UsesSession()
  static async statik(): Promise<number> {
    return 1;
  }
}

export class Rejected {
  // @ts-expect-error: a method that does not return a promise
  @UsesSession()
  sync(): number {
    return 1;
  }

  // @ts-expect-error: a method that returns void
  @Transactional()
  nothing(): void {}
}

// @ts-expect-error: an option that does not exist
UsesSession({ transactional: true });

// @ts-expect-error: a propagation mode that does not exist
Transactional({ propagation: "nested" });
