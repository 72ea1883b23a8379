import { expect } from "chai";
import { Lease } from "../src/core/driver/lease.js";

/** Settle pending promise reactions. */
const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe("the connection lease of single-connection drivers", () => {
  const a = { name: "a" };
  const b = { name: "b" };
  const c = { name: "c" };

  it("statement holds run side by side; a holder alone waits for them, then has it to itself", async () => {
    const lease = new Lease<object>();
    expect(lease.acquire(a, true)).to.equal(undefined);
    expect(lease.acquire(b, true)).to.equal(undefined);
    const log: string[] = [];
    void lease.acquire(c)!.then(() => log.push("c alone"));
    lease.release(a);
    await tick();
    expect(log).to.deep.equal([]);
    lease.release(b);
    await tick();
    expect(log).to.deep.equal(["c alone"]);
    expect(lease.holder).to.equal(c);
    // The holder takes it again without waiting, also for its statements.
    expect(lease.acquire(c, true)).to.equal(undefined);
    lease.release(c);
    expect(lease.holder).to.equal(c);
  });

  it("nobody overtakes a waiter: statement holds asked after a waiting holder queue behind it", async () => {
    const lease = new Lease<object>();
    expect(lease.acquire(a, true)).to.equal(undefined);
    const log: string[] = [];
    void lease.acquire(b)!.then(() => log.push("b alone"));
    void lease.acquire(c, true)!.then(() => log.push("c statement"));
    lease.release(a);
    await tick();
    expect(log).to.deep.equal(["b alone"]);
    lease.release(b);
    await tick();
    expect(log).to.deep.equal(["b alone", "c statement"]);
    expect(lease.holder).to.equal(undefined);
  });

  it("cancelling a waiting holder lets in the statement holds queued behind it", async () => {
    const lease = new Lease<object>();
    expect(lease.acquire(a, true)).to.equal(undefined);
    const refused = lease.acquire(b)!.then(
      () => "granted",
      (error: unknown) => String(error),
    );
    const granted = lease.acquire(c, true)!.then(() => "granted");
    lease.cancel(b, () => new Error("b closed"));
    expect(await refused).to.equal("Error: b closed");
    expect(await granted).to.equal("granted");
  });

  it("a holder that holds nothing gives nothing back: a late release never drops another holder's statement hold", async () => {
    const lease = new Lease<object>();
    expect(lease.acquire(a)).to.equal(undefined);
    lease.releaseAll(a); // closed while its statement was still running
    expect(lease.acquire(b, true)).to.equal(undefined);
    const log: string[] = [];
    void lease.acquire(c)!.then(() => log.push("c alone"));
    lease.release(a); // a's statement ends
    await tick();
    expect(log).to.deep.equal([]);
    lease.release(b);
    await tick();
    expect(log).to.deep.equal(["c alone"]);
  });
});
