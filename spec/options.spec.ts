import { expect } from "chai";
import { type SessionRegistry, withSession } from "../src/index.js";
import { TempSqlite } from "./support/sqlite.js";
import { rejectionOf } from "./support/util.js";

describe("guarantee 6: invalid options", () => {
  let db: TempSqlite;
  let reg: SessionRegistry;
  before(() => {
    db = new TempSqlite();
    reg = db.registry();
  });
  after(() => db.dispose());

  const cases: [string, unknown, typeof TypeError | typeof RangeError, RegExp][] = [
    ["a string instead of options", "yes", TypeError, /session options to be an object, got `"yes"` \(string\)/],
    ["an unknown option", { transactional: true }, TypeError, /Unknown session option `transactional`/],
    ["transaction", { transaction: "yes" }, TypeError, /`transaction` to be a boolean, got `"yes"` \(string\)/],
    [
      "isolation",
      { isolation: "SNAPSHOT" },
      RangeError,
      /`isolation` to be one of "READ UNCOMMITTED".*got `"SNAPSHOT"` \(string\)/,
    ],
    [
      "propagation",
      { propagation: "nested" },
      RangeError,
      /`propagation` to be one of "required", "requiresNew", "mandatory", got `"nested"`/,
    ],
    ["savepoint", { savepoint: 0 }, TypeError, /`savepoint` to be a boolean, got `0` \(number\)/],
    ["readOnly", { readOnly: "true" }, TypeError, /`readOnly` to be a boolean/],
    ["durable", { durable: null }, TypeError, /`durable` to be a boolean, got `null` \(null\)/],
    ["name", { name: 5 }, TypeError, /`name` to be a string, got `5` \(number\)/],
    ["registry", { registry: {} }, TypeError, /`registry` to be a SessionRegistry/],
    [
      "transaction: false with isolation",
      { transaction: false, isolation: "SERIALIZABLE" },
      TypeError,
      /contradicts `isolation`/,
    ],
  ];

  for (const [what, options, type, message] of cases) {
    it(`${what}: rejects (never throws synchronously) with ${type.name}`, async () => {
      let promise: Promise<unknown> | undefined;
      expect(() => (promise = reg.withSession(() => 1, options as never))).not.to.throw();
      const error = await rejectionOf(promise!);
      expect(error).to.be.instanceOf(type);
      expect((error as Error).message).to.match(message);
    });
  }

  it("a body that is not a function rejects with TypeError", async () => {
    let promise: Promise<unknown> | undefined;
    expect(() => (promise = withSession(null as never))).not.to.throw();
    expect(await rejectionOf(promise!)).to.be.instanceOf(TypeError);
    expect(await rejectionOf(reg.scope("x" as never))).to.be.instanceOf(TypeError);
  });

  it("the name defaults to the body's function name", async () => {
    const names: (string | undefined)[] = [];
    reg.on("open", (e) => names.push(e.name));
    await reg.withSession(async function importInvoices() {});
    await reg.withSession(async () => undefined);
    await reg.withSession(async function named() {}, { name: "explicit" });
    expect(names).to.deep.equal(["importInvoices", undefined, "explicit"]);
  });

  it("isolation, readOnly and durable imply a transaction", async () => {
    for (const options of [{ isolation: "SERIALIZABLE" as const }, { readOnly: true }, { durable: true }]) {
      expect(await reg.withSession((s) => s.inTransaction, options)).to.equal(true);
    }
  });
});
