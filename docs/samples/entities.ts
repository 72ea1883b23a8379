/**
 * Entities shared by the code samples of the guides in docs/. This folder is type-checked by
 * `tsc -p tsconfig.json`; docs/check-samples.mjs checks that the guides quote it verbatim.
 */
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";

@Entity("users")
export class User {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  email!: string;

  @Column("text", { default: "active" })
  state!: string;
}

@Entity("orders")
export class Order {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("integer")
  userId!: number;

  @Column("integer")
  total!: number;
}

/** Stands in for whatever the application does after a commit (send a mail, publish an event). */
export async function notify(message: string): Promise<void> {
  await Promise.resolve(message);
}
