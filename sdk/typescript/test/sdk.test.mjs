// The SDK against a real kilnd and real guests: the seed's calls, a Sandbox's requests to its
// app (with a token it renews itself after a revocation), files, processes (output before the
// exit, stdin, a terminal resized, signals), and typed errors.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, KilnError, Sandbox } from "../dist/index.js";
import { executorContext, startKilnd } from "./helpers.mjs";

let kilnd;
let client;
let sb;

before(async () => {
  kilnd = await startKilnd();
  client = new Client({ home: kilnd.home });
  const created = await client.createMicrovmImage({ name: "ts-executor", codeArtifact: { bytes: executorContext() } });
  const image = await client.waitMicrovmImage(created.imageIdentifier);
  assert.equal(image.status, "SUCCESSFUL");
  sb = await Sandbox.create("ts-executor", { client });
});

after(async () => {
  await sb?.terminate();
  await kilnd?.stop();
});

test("the seed's calls and a sandbox's app requests", async () => {
  const images = await client.listMicrovmImages();
  assert.ok(images.images.some((i) => i.name === "ts-executor"));
  const vm = await client.getMicrovm(sb.microvmId);
  assert.equal(vm.state, "RUNNING");
  const run = async () => {
    const resp = await sb.fetch("/execute", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ code: "echo $((6*7))" }),
    });
    assert.equal(resp.status, 200, await resp.clone().text());
    return (await resp.json()).stdout;
  };
  assert.equal(await run(), "42\n");
  // Tokens revoked: the next request gets a 401, takes a fresh token and goes through.
  await client.revokeMicrovmAuthTokens(sb.microvmId);
  assert.equal(await run(), "42\n");
  // The endpoint works as RunMicrovm returned it, with a token of createMicrovmAuthToken.
  const token = await client.createMicrovmAuthToken({ microvmIdentifier: sb.microvmId, expirationInMinutes: 5 });
  const direct = await fetch(`http://${sb.endpoint}/execute`, {
    method: "POST",
    headers: { "X-Kiln-Auth": token.authToken["X-Kiln-Auth"], "content-type": "application/json" },
    body: JSON.stringify({ code: "echo direct" }),
  });
  assert.equal((await direct.json()).stdout, "direct\n");
  const unauthorized = await fetch(`http://${sb.endpoint}/execute`, { method: "POST" });
  assert.equal(unauthorized.status, 401);
});

test("files", async () => {
  const data = new Uint8Array(3 << 20).map((_, i) => (i * 7) & 0xff);
  const entry = await sb.writeFile("/tmp/ts/blob.bin", data, { mode: "0600", createParents: true });
  assert.deepEqual([entry.size, entry.mode, entry.kind], [data.length, "0600", "file"]);
  assert.deepEqual(await sb.readFile("/tmp/ts/blob.bin"), data);
  await sb.writeFile("/tmp/ts/note.txt", "hello\n");
  const names = (await sb.listFiles("/tmp/ts")).entries.map((e) => e.name);
  assert.deepEqual(names, ["blob.bin", "note.txt"]);
  await assert.rejects(client.statFile(sb.microvmId, "/tmp/ts/missing"), (e) => e instanceof KilnError && e.status === 404);
});

test("processes: streamed output, stdin, a terminal, signals", async () => {
  const p = await sb.startProcess({ shell: "echo ready; read l; echo got:$l; echo late >&2", stdin: true, tag: "ts" });
  const out = await sb.processOutput(p.pid);
  const chunks = out[Symbol.asyncIterator]();
  const first = (await chunks.next()).value;
  assert.deepEqual([first.stream, first.offset, Buffer.from(first.data).toString()], ["stdout", 0, "ready\n"]);
  assert.equal((await client.getProcess(sb.microvmId, p.pid)).running, true, "output came before the exit");
  await sb.writeProcessStdin(p.pid, "hi\n", { eof: true });
  let rest = "";
  for (let r = await chunks.next(); !r.done; r = await chunks.next()) rest += Buffer.from(r.value.data).toString();
  assert.equal(rest, "got:hi\nlate\n");
  assert.equal(out.exit?.exitCode, 0);
  assert.equal(out.position, 18);
  const replay = await sb.processOutput(p.pid, { from: 6 });
  assert.equal(await replay.text(), "got:hi\nlate\n");

  const t = await sb.startProcess({ shell: "stty size; read x; stty size", pty: { cols: 100, rows: 30 } });
  const term = (await sb.processOutput(t.pid))[Symbol.asyncIterator]();
  let text = "";
  while (!text.includes("30 100")) text += Buffer.from((await term.next()).value.data).toString();
  await client.resizeProcess(sb.microvmId, t.pid, { cols: 120, rows: 50 });
  await sb.writeProcessStdin(t.pid, "\n");
  text = "";
  for (let r = await term.next(); !r.done; r = await term.next()) text += Buffer.from(r.value.data).toString();
  assert.match(text, /50 120/);

  const s = await sb.startProcess({ command: ["sleep", "600"] });
  await sb.signalProcess(s.pid, "TERM");
  assert.equal((await sb.waitProcess(s.pid, 60_000)).signal, 15);
  const tagged = await client.listProcesses(sb.microvmId, { tag: "ts" });
  assert.deepEqual(tagged.processes.map((x) => x.pid), [p.pid]);
});

test("typed errors", async () => {
  await assert.rejects(client.getMicrovm("mvm-0000000000000000"), (e) => {
    assert.ok(e instanceof KilnError);
    assert.deepEqual([e.status, e.code], [404, "ResourceNotFoundException"]);
    return true;
  });
  await assert.rejects(sb.startProcess({}), (e) => e instanceof KilnError && e.status === 400 && /command/.test(e.message));
  await assert.rejects(new Client({ endpoint: "http://127.0.0.1:9", apiKey: "x" }).getMicrovm("m"),
    (e) => e instanceof KilnError && e.code === "Unreachable");
});
