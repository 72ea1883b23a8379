// Checks that every ```ts block of the guides in docs/*.md is a verbatim copy of a `// #region`
// of docs/samples/*.ts (which `tsc -p tsconfig.json` type-checks), and that every region is quoted.
// In regions, imports of ../../src/... are compared as the package's own import paths.
// Usage: node docs/check-samples.mjs
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const docs = fileURLToPath(new URL(".", import.meta.url));
const samples = join(docs, "samples");
const packagePaths = [
  [/(["'])\.\.\/\.\.\/src\/index\.js\1/g, '"typeorm-scoped-session"'],
  [/(["'])\.\.\/\.\.\/src\/testing\/index\.js\1/g, '"typeorm-scoped-session/testing"'],
  [/(["'])\.\.\/\.\.\/src\/integrations\/([a-z-]+)\.js\1/g, '"typeorm-scoped-session/$2"'],
];

/** Strip trailing blanks and blank lines at both ends; remove the indentation common to all lines. */
function normalize(lines) {
  lines = lines.map((line) => line.trimEnd());
  while (lines.length > 0 && lines[0] === "") lines.shift();
  while (lines.length > 0 && lines.at(-1) === "") lines.pop();
  const indent = Math.min(...lines.filter((l) => l !== "").map((l) => l.length - l.trimStart().length));
  return lines.map((l) => l.slice(Number.isFinite(indent) ? indent : 0)).join("\n");
}

const regions = new Map(); // "file#name" -> { text, used }
const problems = [];
for (const file of readdirSync(samples).filter((f) => f.endsWith(".ts"))) {
  const lines = readFileSync(join(samples, file), "utf8").split("\n");
  const open = [];
  lines.forEach((line, i) => {
    const start = /^\s*\/\/ #region (\S+)\s*$/.exec(line);
    if (start) return void open.push({ name: start[1], from: i + 1, body: [] });
    if (/^\s*\/\/ #endregion\s*$/.test(line)) {
      const region = open.pop();
      if (region === undefined) return void problems.push(`docs/samples/${file}:${i + 1}: #endregion without #region`);
      let text = normalize(region.body);
      for (const [pattern, replacement] of packagePaths) text = text.replace(pattern, replacement);
      const key = `${file}#${region.name}`;
      if (regions.has(key)) problems.push(`docs/samples/${file}:${region.from}: region "${region.name}" defined twice`);
      regions.set(key, { text, used: false, at: `docs/samples/${file}:${region.from}` });
      return;
    }
    for (const region of open) region.body.push(line);
  });
  for (const region of open)
    problems.push(`docs/samples/${file}:${region.from}: #region ${region.name} is never closed`);
}

let blocks = 0;
for (const file of readdirSync(docs).filter((f) => f.endsWith(".md"))) {
  const text = readFileSync(join(docs, file), "utf8");
  for (const match of text.matchAll(/^```(?:ts|typescript)\s*\n([\s\S]*?)^```\s*$/gm)) {
    blocks += 1;
    const code = normalize(match[1].split("\n"));
    const line = text.slice(0, match.index).split("\n").length;
    const found = [...regions.values()].filter((r) => r.text === code);
    if (found.length === 0) {
      problems.push(
        `docs/${file}:${line}: this ts block is not a region of docs/samples/*.ts (first line: ${code.split("\n")[0]})`,
      );
    }
    for (const region of found) region.used = true;
  }
}
for (const region of regions.values()) {
  if (!region.used) problems.push(`${region.at}: region is quoted by no guide in docs/*.md`);
}

if (problems.length > 0) {
  console.error(problems.join("\n"));
  console.error(`check-samples: ${problems.length} problem(s)`);
  process.exit(1);
}
console.log(`check-samples: ${blocks} code blocks match ${regions.size} regions of docs/samples`);
