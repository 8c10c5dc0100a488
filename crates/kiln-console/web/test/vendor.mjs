// The vendored xterm.js files are the ones package-lock.json pins: `--write` copies them from
// node_modules (after `npm ci`) into vendor/; without it, this checks they are byte for byte
// the same (the console test does, so a hand-edited or stale vendor/ fails CI).
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const WEB = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const VENDORED = [
  ["@xterm/xterm/lib/xterm.mjs", "xterm.mjs"],
  ["@xterm/xterm/css/xterm.css", "xterm.css"],
  ["@xterm/addon-fit/lib/addon-fit.mjs", "addon-fit.mjs"],
];

/** The vendored files that differ from node_modules. */
export function stale() {
  return VENDORED.filter(([from, to]) => {
    const want = readFileSync(join(WEB, "node_modules", from));
    const have = readFileSync(join(WEB, "vendor", to));
    return !want.equals(have);
  }).map(([, to]) => to);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (process.argv.includes("--write")) {
    for (const [from, to] of VENDORED) {
      writeFileSync(join(WEB, "vendor", to), readFileSync(join(WEB, "node_modules", from)));
    }
  } else {
    const bad = stale();
    if (bad.length) {
      console.error(`vendor/ differs from package-lock.json's packages: ${bad.join(", ")} (run npm run vendor)`);
      process.exit(1);
    }
  }
}
