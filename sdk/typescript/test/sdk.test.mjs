// The SDK against a real kilnd and real guests: the seed's calls, a Sandbox's requests to its
// app (with a token it renews itself after a revocation), files, processes (output before the
// exit, stdin, a terminal resized, signals), labels, metrics, signed webhook deliveries, and
// typed errors.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { createServer } from "node:http";

import { Client, KilnError, Sandbox, verifyWebhook } from "../dist/index.js";
import { executorContext, startKilnd } from "./helpers.mjs";

let kilnd;
let client;
let sb;

before(async () => {
  // Webhook targets on loopback are refused unless kilnd allows them: the receiver below is.
  kilnd = await startKilnd("--allow-private-webhook-targets");
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
  const p = await sb.startProcess({ shell: "echo ready; read l; echo got:$l; sleep 1; echo late >&2", stdin: true, tag: "ts" });
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

test("labels, metrics and signed webhook deliveries", async () => {
  const labeled = await client.updateMicrovm(sb.microvmId, { team: "ts" });
  assert.equal(labeled.labels?.team, "ts");
  const found = await client.listMicrovms({ label: ["team=ts"] });
  assert.deepEqual(found.microvms.map((v) => v.microvmId), [sb.microvmId]);
  assert.equal((await client.listMicrovms({ label: ["team=other"] })).microvms.length, 0);
  const deadline = Date.now() + 30_000;
  let history = await client.getMicrovmMetrics(sb.microvmId);
  while (history.samples.length === 0) {
    assert.ok(Date.now() < deadline, "no metrics sample within 30 s");
    await new Promise((r) => setTimeout(r, 200));
    history = await client.getMicrovmMetrics(sb.microvmId);
  }
  assert.ok(history.samples.at(-1).hostMemoryBytes > 0, JSON.stringify(history.samples.at(-1)));

  const got = [];
  const server = createServer((req, res) => {
    const parts = [];
    req.on("data", (c) => parts.push(c));
    req.on("end", () => {
      got.push({ signature: req.headers["kiln-signature"], body: Buffer.concat(parts) });
      res.writeHead(204).end();
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  try {
    const hook = await client.createWebhook({ url: `http://127.0.0.1:${server.address().port}/in`, events: ["microvm"] });
    assert.equal(hook.secret?.length, 64);
    const vm = await client.runMicrovm({ imageIdentifier: "ts-executor" });
    await client.waitMicrovm(vm.microvmId, "RUNNING");
    const until = Date.now() + 30_000;
    const running = () => got.find((g) => JSON.parse(g.body).event.toState === "RUNNING");
    while (!running()) {
      assert.ok(Date.now() < until, `no RUNNING delivery: ${got.length} deliveries`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const { signature, body } = running();
    const payload = verifyWebhook(hook.secret, body, signature);
    assert.deepEqual([payload.webhookId, payload.event.microvmId], [hook.webhookId, vm.microvmId]);
    assert.throws(() => verifyWebhook(hook.secret, Buffer.concat([body, Buffer.from(" ")]), signature), /does not match/);
    assert.throws(() => verifyWebhook(hook.secret, body, signature, { nowSeconds: Date.now() / 1000 + 3600 }), /replay/);
    const log = await client.listWebhookDeliveries(hook.webhookId);
    assert.ok(log.deliveries.some((d) => d.status === "delivered"), JSON.stringify(log));
    await client.deleteWebhook(hook.webhookId);
    assert.deepEqual((await client.listWebhooks()).webhooks, []);
    const nodes = await client.listNodes();
    assert.deepEqual(nodes.nodes.map((n) => n.name), [nodes.thisNode]);
    await client.terminateMicrovm(vm.microvmId);
  } finally {
    server.close();
  }
});
