import { Body, Controller, Get, Post } from "@nestjs/common";
import type { Cat } from "./cat.entity.js";
import { CatsService } from "./cats.service.js";

@Controller("cats")
export class CatsController {
  readonly #cats: CatsService;

  constructor(cats: CatsService) {
    this.#cats = cats;
  }

  @Get()
  list(): Promise<Cat[]> {
    return this.#cats.list();
  }

  @Post()
  adopt(@Body() body: { name: string }): Promise<Cat> {
    return this.#cats.adopt(body.name);
  }

  @Post("give")
  give(@Body() body: { from: number; to: number; lives: number }): Promise<Cat[]> {
    return this.#cats.give(body.from, body.to, body.lives);
  }
}
