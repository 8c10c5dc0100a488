// The console in a real browser (Debian's Chromium, driven by playwright-core) against a real
// kilnd and real guests: sign-in (a wrong key refused, the cookie's flags, nothing in
// storage), CSRF (a cookie-only change refused), an image built from an uploaded context with
// its log streaming, a microVM run, a terminal that prints the guest's kernel, a file
// downloaded, a suspend seen without a reload, terminate, sign-out. Screenshots of the main
// pages go to KILN_CONSOLE_SHOTS (default: a temporary directory).
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import test from "node:test";

import { chromium } from "playwright-core";

import { REPO, executorContext, startKilnd } from "../../../../sdk/typescript/test/helpers.mjs";
import { stale } from "./vendor.mjs";

const CHROMIUM = process.env.KILN_CHROMIUM ?? "/usr/bin/chromium";
const SHOTS = process.env.KILN_CONSOLE_SHOTS ?? join(tmpdir(), "kiln-console-shots");
const BUILD_MS = 15 * 60_000;

test("the vendored xterm.js files are the ones package-lock.json pins", () => {
  assert.deepEqual(stale(), []);
});

/** The REST API with the key, for what the test checks behind the browser's back. */
function rest(base, key) {
  return async (method, path, json) => {
    const r = await fetch(base + path, {
      method,
      headers: { Authorization: `Bearer ${key}`, ...(json ? { "Content-Type": "application/json" } : {}) },
      body: json ? JSON.stringify(json) : undefined,
    });
    const text = await r.text();
    assert.ok(r.ok, `${method} ${path}: ${r.status} ${text}`);
    return text ? JSON.parse(text) : null;
  };
}

test("the console signs in, builds, runs, opens a terminal, downloads, suspends and terminates", async () => {
  mkdirSync(SHOTS, { recursive: true });
  const d = await startKilnd();
  const base = `http://${readFileSync(join(d.home, "kilnd.addr"), "utf8").trim()}`;
  const key = readFileSync(join(d.home, "api-key"), "utf8").trim();
  const call = rest(base, key);
  // Root needs --no-sandbox; the test runs nothing but kilnd's own pages.
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  let failure = (e) => { throw e; };
  try {
    const ctx = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 1000 } });
    const page = await ctx.newPage();
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(e.message));
    // What the page said, shown if a step fails (with a screenshot of where it stood).
    const said = [];
    page.on("console", (m) => said.push(`${m.type()}: ${m.text()}`));
    failure = async (e) => {
      await page.screenshot({ path: join(SHOTS, "failed.png"), fullPage: true }).catch(() => {});
      e.message += `\nthe page's console:\n${said.join("\n")}\nscreenshot: ${join(SHOTS, "failed.png")}`;
      throw e;
    };
    page.on("dialog", (dialog) => dialog.accept());

    await page.goto(`${base}/console/`);
    await page.getByRole("heading", { name: "Sign in to kiln" }).waitFor();
    await page.screenshot({ path: join(SHOTS, "1-sign-in.png") });
    // A wrong key is refused, and says where the right one is.
    await page.fill("input[name=apiKey]", "0".repeat(64));
    await page.click("button[type=submit]");
    await page.getByText("not this kilnd's API key").waitFor();
    assert.equal((await ctx.cookies()).length, 0);

    // By keyboard: the key, then Enter.
    await page.fill("input[name=apiKey]", key);
    await page.press("input[name=apiKey]", "Enter");
    await page.getByRole("heading", { name: "microVMs" }).waitFor();
    const [cookie] = await ctx.cookies();
    assert.equal(cookie.name, "kiln_session");
    assert.equal(cookie.httpOnly, true);
    assert.equal(cookie.sameSite, "Strict");
    const stored = await page.evaluate(() => [localStorage.length, sessionStorage.length, document.cookie]);
    assert.deepEqual(stored, [0, 0, ""], "nothing readable by scripts holds the key or the session");

    // The cookie alone reads, but changes nothing: a forged request lacks the CSRF token.
    const forged = await page.evaluate(async () => {
      const read = await fetch("/v1/microvms");
      const write = await fetch("/v1/microvms", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ imageIdentifier: "anything" }),
      });
      return [read.status, write.status, (await write.json()).message];
    });
    assert.equal(forged[0], 200);
    assert.equal(forged[1], 401);
    assert.match(forged[2], /CSRF/);

    // An image from an uploaded build context, its log streaming to the end.
    await page.click("nav >> text=Images");
    await page.click("text=New image");
    await page.fill("input[name=name]", "web");
    await page.setInputFiles("input[name=archive]", {
      name: "context.tar",
      mimeType: "application/x-tar",
      buffer: Buffer.from(executorContext()),
    });
    await page.click("button[type=submit]");
    await page.getByRole("heading", { name: "Image web" }).waitFor();
    const log = page.getByLabel("build log");
    await log.getByText("Step 1/3", { exact: false }).waitFor({ timeout: BUILD_MS });
    await page.getByTestId("image-status").getByText("SUCCESSFUL").waitFor({ timeout: BUILD_MS });
    await page.screenshot({ path: join(SHOTS, "2-image.png"), fullPage: true });

    // Rebuild sends the recorded request again: a new build of the same name.
    const first = (await call("GET", "/v1/images/web")).imageIdentifier;
    await page.getByRole("button", { name: "Rebuild" }).click();
    await page.locator("#flash").getByText("Rebuilding web", { exact: false }).waitFor();
    await page.getByTestId("image-status").getByText("SUCCESSFUL").waitFor({ timeout: BUILD_MS });
    const rebuilt = await call("GET", "/v1/images/web");
    assert.notEqual(rebuilt.imageIdentifier, first);
    assert.equal(rebuilt.status, "SUCCESSFUL");

    // A directory picked in the browser is packed as a tar there (scripts made executable).
    await page.click("nav >> text=Images");
    await page.click("text=New image");
    await page.fill("input[name=name]", "webdir");
    await page.setInputFiles("input[name=directory]", join(REPO, "examples", "busybox-executor"));
    await page.click("button[type=submit]");
    await page.getByRole("heading", { name: "Image webdir" }).waitFor();
    await page.getByTestId("image-status").getByText("SUCCESSFUL").waitFor({ timeout: BUILD_MS });
    await page.click("nav >> text=Images");
    await page.getByRole("row", { name: /webdir/ }).getByText("SUCCESSFUL").waitFor();
    await page.getByRole("link", { name: "web", exact: true }).click();
    await page.getByRole("heading", { name: "Image web" }).waitFor();

    // A microVM of it, from the form.
    await page.click("text=Run a microVM");
    await page.getByRole("heading", { name: "Run a microVM" }).waitFor();
    await page.click("button[type=submit]");
    await page.getByRole("heading", { name: /^microVM mvm-/ }).waitFor();
    const id = decodeURIComponent(new URL(page.url()).hash.split("/")[2]);
    await page.getByTestId("microvm-state").getByText("RUNNING").waitFor({ timeout: 5 * 60_000 });

    // The terminal runs in the guest: uname prints the guest's kernel, not the host's.
    const guest = await call("POST", `/v1/microvms/${id}/exec`, { command: ["uname", "-r"] });
    const release = guest.stdout.trim();
    assert.ok(release.length > 0);
    await page.click("text=Open a terminal");
    const terminal = page.getByTestId("terminal");
    // The shell's prompt first: what is typed before the socket opens is not sent.
    await terminal.locator(".xterm-rows").getByText("#", { exact: false }).first().waitFor({ timeout: 60_000 });
    await terminal.click();
    await page.keyboard.type("uname -a\n");
    await terminal.getByText(release, { exact: false }).first().waitFor({ timeout: 60_000 });
    assert.match(await terminal.locator(".xterm-rows").innerText(), /Linux/);
    // The terminal follows the window: a narrower page is fewer columns in the guest's pty.
    const size = async (mark) => {
      await page.keyboard.type(`echo ${mark}=$(stty size | tr ' ' x)\n`);
      const out = terminal.getByText(new RegExp(`^${mark}=\\d+x\\d+`)).first();
      await out.waitFor({ timeout: 60_000 });
      return (await out.innerText()).trim().split("=")[1].split("x").map(Number);
    };
    const [, wide] = await size("before");
    await page.setViewportSize({ width: 700, height: 1000 });
    await page.waitForTimeout(500);
    const [, narrow] = await size("after");
    assert.ok(narrow < wide, `${narrow} columns after narrowing, ${wide} before`);
    await page.setViewportSize({ width: 1280, height: 1000 });

    // A file the guest has, downloaded through the file browser.
    await call("POST", `/v1/microvms/${id}/exec`, { command: ["sh", "-c", "mkdir -p /srv/out && echo made-in-the-guest > /srv/out/result.txt"] });
    await page.fill("input[name=path]", "/srv/out");
    await page.click("form.filters button[type=submit]");
    const row = page.getByRole("row", { name: /result\.txt/ });
    const [download] = await Promise.all([page.waitForEvent("download"), row.getByText("Download").click()]);
    assert.equal(download.suggestedFilename(), "result.txt");
    assert.equal(readFileSync(await download.path(), "utf8"), "made-in-the-guest\n");
    await page.screenshot({ path: join(SHOTS, "3-microvm.png"), fullPage: true });

    // A file uploaded through the browser lands in the guest; deleting it there removes it.
    await page.setInputFiles("input[name=upload]", { name: "up.txt", mimeType: "text/plain", buffer: Buffer.from("from-the-browser") });
    const upRow = page.getByRole("row", { name: /up\.txt/ });
    await upRow.waitFor();
    const cat = await call("POST", `/v1/microvms/${id}/exec`, { command: ["cat", "/srv/out/up.txt"] });
    assert.equal(cat.stdout, "from-the-browser");
    await upRow.getByRole("button", { name: "Delete" }).click();
    await upRow.waitFor({ state: "detached" });
    const left = await call("POST", `/v1/microvms/${id}/exec`, { command: ["ls", "/srv/out"] });
    assert.equal(left.stdout.trim(), "result.txt");

    // A token, and its curl line works: its header and address reach the app through the ingress.
    await page.getByRole("button", { name: "Create a token" }).click();
    const line = await page.getByTestId("curl-line").innerText();
    const [, token, appUrl] = line.match(/^curl -H 'X-Kiln-Auth: ([^']+)' (\S+)$/);
    const app = await fetch(`${appUrl}health`, { headers: { "X-Kiln-Auth": token } });
    assert.equal(app.status, 200);
    assert.match(await app.text(), /ready/);
    assert.equal((await fetch(`${appUrl}health`)).status, 401, "not without the token");

    // The image cannot go while a microVM uses it: the page says why.
    await page.getByRole("link", { name: "web", exact: true }).click();
    await page.getByRole("heading", { name: "Image web" }).waitFor();
    await page.getByRole("button", { name: "Delete" }).click();
    await page.locator("#flash").getByText("terminate them first", { exact: false }).waitFor();
    assert.equal((await call("GET", "/v1/images/web")).status, "SUCCESSFUL");
    await page.goBack();
    await page.getByRole("heading", { name: new RegExp(id) }).waitFor();

    // Fork: the copy opens on its own page.
    await page.getByRole("button", { name: "Fork" }).click();
    await page.waitForURL((u) => u.hash.startsWith("#/microvms/mvm-") && !u.hash.includes(id), { timeout: 5 * 60_000 });
    const child = decodeURIComponent(new URL(page.url()).hash.split("/")[2]);
    await page.getByRole("heading", { name: new RegExp(child) }).waitFor();
    assert.equal((await call("GET", `/v1/microvms/${child}`)).microvmId, child);
    await call("POST", `/v1/microvms/${child}/terminate`, {});
    await page.goBack();
    await page.getByRole("heading", { name: new RegExp(id) }).waitFor();

    // Suspend: the state changes on the page without a reload (the marker survives).
    await page.evaluate(() => { window.kilnMarker = "same page"; });
    await page.getByRole("button", { name: "Suspend" }).click();
    await page.getByTestId("microvm-state").getByText("SUSPENDED").waitFor({ timeout: 5 * 60_000 });
    assert.equal(await page.evaluate(() => window.kilnMarker), "same page");
    await page.getByRole("list", { name: "events" }).getByText("RUNNING → SUSPENDED").waitFor();

    await page.getByRole("button", { name: "Terminate" }).click();
    await page.getByTestId("microvm-state").getByText("TERMINATED").waitFor({ timeout: 5 * 60_000 });
    assert.equal((await call("GET", `/v1/microvms/${id}`)).state, "TERMINATED");
    await page.click("nav >> text=microVMs");
    await page.getByRole("row", { name: new RegExp(id) }).getByText("TERMINATED").waitFor();
    await page.screenshot({ path: join(SHOTS, "4-microvms.png"), fullPage: true });
    // Readable on a phone: nothing wider than the screen.
    await page.setViewportSize({ width: 390, height: 844 });
    assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= 390), "the list overflows a narrow screen");
    await page.screenshot({ path: join(SHOTS, "5-microvms-narrow.png"), fullPage: true });

    // Signing out ends the session for every request that still carries the cookie.
    const sessionCookie = `kiln_session=${(await ctx.cookies())[0].value}`;
    await page.click("nav >> text=Sign out");
    await page.getByRole("heading", { name: "Sign in to kiln" }).waitFor();
    const after = await fetch(`${base}/v1/microvms`, { headers: { Cookie: sessionCookie } });
    assert.equal(after.status, 401);
    assert.deepEqual(pageErrors, []);
  } catch (e) {
    await failure(e);
  } finally {
    await browser.close();
    await d.stop();
  }
});
