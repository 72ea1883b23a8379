/**
 * NestJS module: the session registry as a global module, one session scope per
 * HTTP request on the Express and Fastify platforms, session repositories for
 * dependency injection, and a drain on shutdown.
 *
 * @module typeorm-scoped-session/nestjs
 */
export { SessionModule } from "./nestjs/module.js";
export type {
  SessionModuleAsyncOptions,
  SessionModuleBehaviour,
  SessionModuleOptions,
  SessionModuleRegistryOptions,
} from "./nestjs/module.js";
export { getSessionRepositoryToken, InjectSessionRepository } from "./nestjs/repository.js";
export { SessionRegistry } from "../core/registry/registry.js";
