// @ts-check
import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["dist/", "build/", "build-*/", "docs/api/", "node_modules/", "**/*.cjs", "eslint.config.js"] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      "@typescript-eslint/no-floating-promises": "error",
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      // No `any` and nothing done with one: TypeORM's `any`s (query results) are named as
      // `unknown` or a type where they enter, so that they do not spread unchecked.
      "@typescript-eslint/no-explicit-any": "error",
      "@typescript-eslint/no-unsafe-return": "error",
      "@typescript-eslint/no-unsafe-assignment": "error",
      "@typescript-eslint/no-unsafe-member-access": "error",
      "@typescript-eslint/no-unsafe-call": "error",
      "@typescript-eslint/no-unsafe-argument": "error",
      // Block bodies may be async without awaiting: the API takes `(s) => T | Promise<T>`.
      "@typescript-eslint/require-await": "off",
      // Errors caught from user code and drivers are passed on as they are, whatever their type.
      "@typescript-eslint/prefer-promise-reject-errors": "off",
    },
  },
  {
    // Decorators receive arbitrary method and constructor signatures: their public overloads
    // constrain with `(...args: any[])`, as a method's own parameter types are not assignable to
    // `unknown` ones. Only writing `any` is allowed here; using an `any` value is still an error.
    files: ["src/decorators/**/*.ts"],
    rules: { "@typescript-eslint/no-explicit-any": "off" },
  },
  {
    files: ["**/*.mjs"],
    ...tseslint.configs.disableTypeChecked,
    languageOptions: {
      ...tseslint.configs.disableTypeChecked.languageOptions,
      globals: { console: "readonly", process: "readonly", URL: "readonly" },
    },
  },
  {
    files: ["spec/**/*.ts"],
    rules: {
      // chai's `expect(x).to.be.true` style and mocha's `this` are fine in tests.
      "@typescript-eslint/no-unused-expressions": "off",
      "@typescript-eslint/unbound-method": "off",
    },
  },
);
