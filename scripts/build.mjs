// Builds dist/ from src/ and the `exports` of package.json, so that `require` and `import`
// share one module instance (one defaultRegistry, one AsyncLocalStorage):
//
//   dist/cjs/**            the implementation, CommonJS (tsconfig.build.cjs.json), with its
//                          declarations and source maps (they point into the shipped src/);
//   dist/<entry>.js        per export, an ES module that re-exports the CommonJS one by name;
//   dist/<entry>.d.ts      its declarations: `export *` from the CommonJS declarations.
//
// A subpath is one `exports` entry and one `typesVersions` entry in package.json; this
// script derives everything else from them and stops with a message when they disagree.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import ts from "typescript";

const root = resolve(import.meta.dirname, "..");
const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const cjsDir = "dist/cjs";

/** The entries of `exports` that are modules, each with its ES-module and CommonJS files. */
function entries() {
  const problems = [];
  const list = [];
  for (const [subpath, target] of Object.entries(pkg.exports)) {
    if (typeof target === "string") continue; // ./package.json
    const esm = target.import?.default;
    const match = /^\.\/dist\/(.+)\.js$/.exec(esm ?? "");
    if (!match) {
      problems.push(`exports["${subpath}"].import.default must be ./dist/<name>.js (found ${esm})`);
      continue;
    }
    const name = match[1];
    const expected = {
      import: { types: `./dist/${name}.d.ts`, default: `./dist/${name}.js` },
      require: { types: `./${cjsDir}/${name}.d.ts`, default: `./${cjsDir}/${name}.js` },
    };
    if (JSON.stringify(target) !== JSON.stringify(expected)) {
      problems.push(`exports["${subpath}"] must be ${JSON.stringify(expected)}`);
    }
    const key = subpath.slice(2);
    const typesVersion = pkg.typesVersions?.["*"]?.[key];
    if (subpath !== "." && JSON.stringify(typesVersion) !== JSON.stringify([expected.require.types])) {
      problems.push(
        `typesVersions["*"]["${key}"] must be ["${expected.require.types}"] ` +
          `(TypeScript's node10 resolution reads subpath types only from there)`,
      );
    }
    list.push({ subpath, name, source: join(root, "src", `${name}.ts`) });
  }
  if (problems.length > 0) {
    throw new Error(`package.json does not describe the build:\n  ${problems.join("\n  ")}`);
  }
  return list;
}

/** `import.meta.url`/`dirname`/`filename` as CommonJS has them. */
function importMetaToCommonJs(context) {
  const f = context.factory;
  const replacements = {
    url: () =>
      f.createPropertyAccessExpression(
        f.createCallExpression(
          f.createPropertyAccessExpression(
            f.createCallExpression(f.createIdentifier("require"), undefined, [f.createStringLiteral("node:url")]),
            "pathToFileURL",
          ),
          undefined,
          [f.createIdentifier("__filename")],
        ),
        "href",
      ),
    dirname: () => f.createIdentifier("__dirname"),
    filename: () => f.createIdentifier("__filename"),
  };
  const visit = (node) => {
    if (
      ts.isPropertyAccessExpression(node) &&
      ts.isMetaProperty(node.expression) &&
      node.expression.keywordToken === ts.SyntaxKind.ImportKeyword
    ) {
      const replace = replacements[node.name.text];
      if (!replace) throw new Error(`import.meta.${node.name.text} has no CommonJS equivalent in the build`);
      return replace();
    }
    return ts.visitEachChild(node, visit, context);
  };
  return (file) => ts.visitNode(file, visit);
}

function compileCommonJs() {
  const config = ts.getParsedCommandLineOfConfigFile(
    join(root, "tsconfig.build.cjs.json"),
    {},
    {
      ...ts.sys,
      onUnRecoverableConfigFileDiagnostic: (d) => {
        throw new Error(ts.flattenDiagnosticMessageText(d.messageText, "\n"));
      },
    },
  );
  const program = ts.createProgram({ rootNames: config.fileNames, options: config.options });
  // TS1343: import.meta under `module: commonjs`; the transformer above rewrites it.
  const diagnostics = [...ts.getPreEmitDiagnostics(program), ...config.errors].filter((d) => d.code !== 1343);
  const result = program.emit(undefined, undefined, undefined, false, { before: [importMetaToCommonJs] });
  diagnostics.push(...result.diagnostics);
  if (diagnostics.length > 0) {
    const host = { getCanonicalFileName: (f) => f, getCurrentDirectory: () => root, getNewLine: () => "\n" };
    throw new Error(ts.formatDiagnostics(diagnostics, host));
  }
  return program;
}

/** The names a module exports as values (what the ES-module wrapper re-exports). */
function valueExports(program, source) {
  const checker = program.getTypeChecker();
  const file = program.getSourceFile(source);
  if (!file) throw new Error(`${relative(root, source)} is missing: package.json exports name it`);
  return checker
    .getExportsOfModule(checker.getSymbolAtLocation(file))
    .filter((symbol) => {
      const target = symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol;
      return (target.flags & ts.SymbolFlags.Value) !== 0;
    })
    .map((symbol) => symbol.name)
    .sort();
}

function writeWrappers(program, list) {
  const banner = "// An ES-module face of the CommonJS build, so that require and import share one instance.\n";
  for (const { name, source } of list) {
    const names = valueExports(program, source);
    if (names.includes("default")) throw new Error(`${name}: a default export is not supported by the build`);
    const path = relative(dirname(join("dist", name)), join(cjsDir, name))
      .split("\\")
      .join("/");
    const cjs = `${path.startsWith(".") ? "" : "./"}${path}.js`;
    const js =
      // Named re-exports: Node finds them in the CommonJS module (cjs-module-lexer reads the
      // `exports.x =` TypeScript emits), and bundlers map them without default-import interop.
      `${banner}export { ${names.join(", ")} } from ${JSON.stringify(cjs)};\n`;
    const dts = `${banner}export * from ${JSON.stringify(cjs)};\n`;
    mkdirSync(dirname(join(root, "dist", name)), { recursive: true });
    writeFileSync(join(root, "dist", `${name}.js`), js);
    writeFileSync(join(root, "dist", `${name}.d.ts`), dts);
  }
}

rmSync(join(root, "dist"), { recursive: true, force: true });
const list = entries();
const program = compileCommonJs();
writeFileSync(join(root, cjsDir, "package.json"), `${JSON.stringify({ type: "commonjs" }, null, 2)}\n`);
writeWrappers(program, list);
