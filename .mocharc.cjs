module.exports = {
  spec: ["build/spec/**/*.spec.js", "build/standard/spec/**/*.spec.js"],
  timeout: 60_000,
  forbidOnly: Boolean(process.env.CI),
  reporter: process.env.CI ? "dot" : "spec",
};
