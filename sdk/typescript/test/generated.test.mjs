// What is checked in is what the tools make: src/api.ts is openapi-typescript's output for
// spec/openapi.yaml (so the SDK is written against the API's own types), dist/ is tsc's output
// for src/ (so `npm install <repo>/sdk/typescript` needs no build step), and such an install
// works from another project.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { REPO, SDK } from "./helpers.mjs";

const bin = (name) => join(SDK, "node_modules", ".bin", name);

test("src/api.ts is generated from spec/openapi.yaml", () => {
  const dir = mkdtempSync(join(tmpdir(), "kiln-ts-gen-"));
  try {
    execFileSync(bin("openapi-typescript"), [join(REPO, "spec", "openapi.yaml"), "-o", join(dir, "api.ts")], { stdio: "pipe" });
    assert.ok(
      readFileSync(join(dir, "api.ts"), "utf8") === readFileSync(join(SDK, "src", "api.ts"), "utf8"),
      "src/api.ts is stale: run `npm run generate && npm run build` in sdk/typescript and commit both",
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("dist/ is the build of src/", () => {
  const dir = mkdtempSync(join(tmpdir(), "kiln-ts-dist-"));
  try {
    execFileSync(bin("tsc"), ["-p", SDK, "--outDir", dir], { stdio: "pipe" });
    const built = readdirSync(dir).sort();
    assert.deepEqual(readdirSync(join(SDK, "dist")).sort(), built);
    for (const f of built) {
      assert.ok(
        readFileSync(join(dir, f), "utf8") === readFileSync(join(SDK, "dist", f), "utf8"),
        `dist/${f} is stale: run \`npm run build\` in sdk/typescript and commit it`,
      );
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("npm installs it from the repo", () => {
  const dir = mkdtempSync(join(tmpdir(), "kiln-ts-user-"));
  try {
    writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "user", version: "1.0.0", type: "module" }));
    execFileSync("npm", ["install", "--no-audit", "--no-fund", "--offline", SDK], { cwd: dir, stdio: "pipe" });
    const out = execFileSync(process.execPath, ["--input-type=module", "-e",
      "import { Client, Sandbox, KilnError } from 'kiln-sdk'; console.log(typeof Client, typeof Sandbox, new KilnError(404, 'X', 'y').status)"],
    { cwd: dir, encoding: "utf8" });
    assert.equal(out.trim(), "function function 404");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
