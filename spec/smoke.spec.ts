import { expect } from "chai";
import { TempSqlite } from "./support/sqlite.js";
import { Note } from "./support/entities.js";

describe("smoke", () => {
  it("works", async () => {
    const db = new TempSqlite();
    const reg = db.registry();
    await reg.withTransaction(async (s) => {
      await s.getRepository(Note).save({ body: "a", block: 1 });
    });
    const n = await reg.withSession((s) => s.getRepository(Note).count());
    expect(n).to.equal(1);
    await db.dispose();
  });
});
