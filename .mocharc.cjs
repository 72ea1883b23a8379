module.exports = {
  spec: ["build/spec/**/*.spec.js", "build/standard/spec/**/*.spec.js"],
  // Starts a throwaway PostgreSQL server for the Postgres specs (skipped, with one line saying
  // why, where the server binaries are missing).
  require: ["build/spec/support/postgres-hooks.js"],
  timeout: 60_000,
  forbidOnly: Boolean(process.env.CI),
  reporter: process.env.CI ? "dot" : "spec",
};
