// A real kilnd on a throw-away home, and the build context of examples/busybox-executor as a
// tar (ustar, written here: Node has no tar of its own and the SDK needs none).
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const SDK = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = resolve(SDK, "../..");
const KILND = join(REPO, "target", "debug", "kilnd");

function header(name, size, mode) {
  const h = Buffer.alloc(512);
  const put = (text, at, len) => h.write(text.slice(0, len), at, len, "ascii");
  const octal = (n, len) => n.toString(8).padStart(len - 1, "0") + "\0";
  put(name, 0, 100);
  put(octal(mode, 8), 100, 8);
  put(octal(0, 8), 108, 8);
  put(octal(0, 8), 116, 8);
  put(octal(size, 12), 124, 12);
  put(octal(0, 12), 136, 12);
  h.fill(" ", 148, 156);
  put("0", 156, 1);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  const sum = h.reduce((a, b) => a + b, 0);
  put(sum.toString(8).padStart(6, "0") + "\0 ", 148, 8);
  return h;
}

/** A tar of `files`: [name, bytes, mode]. */
export function tar(files) {
  const parts = [];
  for (const [name, data, mode] of files) {
    parts.push(header(name, data.length, mode), data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  parts.push(Buffer.alloc(1024));
  return new Uint8Array(Buffer.concat(parts));
}

export function executorContext() {
  const dir = join(REPO, "examples", "busybox-executor");
  return tar(readdirSync(dir).sort().map((n) => [n, readFileSync(join(dir, n)), n.endsWith(".sh") ? 0o755 : 0o644]));
}

/** kilnd with a low idle floor, its guests terminated with it. */
export async function startKilnd(...extra) {
  if (!existsSync(KILND)) throw new Error(`${KILND} is missing: the workspace test build makes it`);
  const home = mkdtempSync(join(tmpdir(), "kiln-ts-test-"));
  const log = openSync(join(home, "kilnd.log"), "a");
  const proc = spawn(KILND, ["--home", home, "--listen", "127.0.0.1:0", "--ingress-listen", "127.0.0.1:0",
    "--min-idle-seconds", "1", "--tick-ms", "200", "--on-shutdown", "terminate", ...extra], { stdio: ["ignore", "ignore", log] });
  const deadline = Date.now() + 60_000;
  while (!existsSync(join(home, "kilnd.addr"))) {
    if (proc.exitCode !== null) throw new Error(readFileSync(join(home, "kilnd.log"), "utf8"));
    if (Date.now() > deadline) throw new Error("kilnd did not start");
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    home,
    log: () => readFileSync(join(home, "kilnd.log"), "utf8"),
    async stop() {
      proc.kill("SIGTERM");
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once("exit", r)));
      rmSync(home, { recursive: true, force: true });
    },
  };
}
