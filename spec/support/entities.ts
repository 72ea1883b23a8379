import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";

@Entity("notes")
export class Note {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  body!: string;

  @Column("integer", { nullable: true })
  block!: number | null;
}

@Entity("accounts")
export class Account {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("integer")
  balance!: number;
}
