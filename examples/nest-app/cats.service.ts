import { ConflictException, Injectable, NotFoundException } from "@nestjs/common";
import type { Repository } from "typeorm";
import { Transactional } from "typeorm-scoped-session";
import { InjectSessionRepository } from "typeorm-scoped-session/nestjs";
import { Cat } from "./cat.entity.js";

@Injectable()
export class CatsService {
  // The registry's scoped repository: each call runs on the session of the current request,
  // inside the transaction of the @Transactional() method that makes it.
  readonly #cats: Repository<Cat>;

  constructor(@InjectSessionRepository(Cat) cats: Repository<Cat>) {
    this.#cats = cats;
  }

  list(): Promise<Cat[]> {
    return this.#cats.find({ order: { id: "ASC" } });
  }

  @Transactional()
  async adopt(name: string): Promise<Cat> {
    if (await this.#cats.existsBy({ name })) throw new ConflictException(`there is a cat named ${name} already`);
    return this.#cats.save({ name, lives: 9 });
  }

  /** Moves lives from one cat to the other: both updates commit, or neither. */
  @Transactional()
  async give(fromId: number, toId: number, lives: number): Promise<Cat[]> {
    const from = await this.#cats.findOneBy({ id: fromId });
    const to = await this.#cats.findOneBy({ id: toId });
    if (from === null || to === null) throw new NotFoundException("no such cat");
    to.lives += lives;
    await this.#cats.save(to);
    from.lives -= lives;
    // Thrown after the first save: the transaction rolls it back.
    if (from.lives < 0) throw new ConflictException(`${from.name} has only ${from.lives + lives} lives`);
    await this.#cats.save(from);
    return [from, to];
  }
}
