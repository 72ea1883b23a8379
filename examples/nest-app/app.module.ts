import { type DynamicModule, Module } from "@nestjs/common";
import { TypeOrmModule } from "@nestjs/typeorm";
import { DataSource, type DataSourceOptions } from "typeorm";
import { parseUrl } from "typeorm-scoped-session";
import { SessionModule } from "typeorm-scoped-session/nestjs";
import { Cat } from "./cat.entity.js";
import { CatsController } from "./cats.controller.js";
import { CatsService } from "./cats.service.js";

@Module({
  imports: [SessionModule.forFeature([Cat])],
  controllers: [CatsController],
  providers: [CatsService],
})
export class CatsModule {}

/**
 * The application module on the database at `url` (default: SQLite in memory):
 * `@nestjs/typeorm` owns the DataSource, `SessionModule` runs each request in a
 * session of it and drains the sessions on shutdown.
 */
export function appModule(url = "sqlite::memory:"): DynamicModule {
  const database = { ...parseUrl(url), entities: [Cat], synchronize: true } as DataSourceOptions;
  return {
    module: AppModule,
    imports: [
      TypeOrmModule.forRoot(database),
      SessionModule.forRootAsync({ useFactory: (ds: DataSource) => ({ dataSource: ds }), inject: [DataSource] }),
      CatsModule,
    ],
  };
}

@Module({})
export class AppModule {}
