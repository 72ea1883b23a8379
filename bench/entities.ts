import "reflect-metadata";
import { Column, Entity, PrimaryGeneratedColumn } from "typeorm";

/** The one table of the benchmarks: rows 1..SEED_ROWS are read by primary key, inserts append. */
@Entity("bench_notes")
export class BenchNote {
  @PrimaryGeneratedColumn()
  id!: number;

  @Column("text")
  body!: string;

  @Column("integer")
  n!: number;
}

/** How many rows are seeded for the primary-key reads. */
export const SEED_ROWS = 1000;
