import { KilnError } from "./errors.js";
import { events } from "./sse.js";
import { seg, Transport } from "./transport.js";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/**
 * A process's output as it comes: iterate it for {@link OutputChunk}s; after the last,
 * `exit` is the process as it exited. A suspend or stop ends it with a KilnError
 * (`OutputEnded`): open it again from `position` after a resume. `close()` detaches.
 */
export class ProcessOutput {
    position;
    exit;
    #resp;
    #abort;
    constructor(resp, from, abort) {
        this.#resp = resp;
        this.position = from;
        this.#abort = abort;
    }
    close() {
        this.#abort.abort();
    }
    async *[Symbol.asyncIterator]() {
        if (!this.#resp.body)
            return;
        for await (const ev of events(this.#resp.body)) {
            if (ev.event === "output") {
                const v = JSON.parse(ev.data);
                const data = new Uint8Array(Buffer.from(v.data, "base64"));
                this.position = v.offset + data.length;
                yield { stream: v.stream, offset: v.offset, data };
            }
            else if (ev.event === "exit") {
                this.exit = JSON.parse(ev.data);
                return;
            }
            else if (ev.event === "error") {
                throw new KilnError(409, "OutputEnded", ev.data);
            }
        }
    }
    /** Every remaining byte until the exit, as text. */
    async text() {
        const parts = [];
        for await (const c of this)
            parts.push(c.data);
        return Buffer.concat(parts).toString("utf8");
    }
}
export class Client {
    http;
    constructor(opts = {}) {
        this.http = new Transport(opts);
    }
    get endpoint() {
        return this.http.endpoint;
    }
    // -- images ------------------------------------------------------------------------------
    async uploadArtifact(bytes, format = "tar") {
        const contentType = format === "zip" ? "application/zip" : "application/x-tar";
        return this.http.call("POST", "/v1/artifacts", { body: bytes, contentType });
    }
    async createMicrovmImage(req) {
        let codeArtifact = req.codeArtifact;
        if ("bytes" in codeArtifact) {
            const art = await this.uploadArtifact(codeArtifact.bytes, codeArtifact.format);
            codeArtifact = { artifactId: art.artifactId };
        }
        return this.http.call("POST", "/v1/images", { json: { ...req, codeArtifact } });
    }
    async getMicrovmImage(imageIdentifier) {
        return this.http.call("GET", `/v1/images/${seg(imageIdentifier)}`);
    }
    async listMicrovmImages(query = {}) {
        return this.http.call("GET", "/v1/images", { query });
    }
    async deleteMicrovmImage(imageIdentifier) {
        await this.http.call("DELETE", `/v1/images/${seg(imageIdentifier)}`);
    }
    /** The image once it is no longer CREATING; a KilnError when it FAILED or time ran out. */
    async waitMicrovmImage(imageIdentifier, timeoutMs = 600_000) {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
            const image = await this.getMicrovmImage(imageIdentifier);
            if (image.status === "SUCCESSFUL")
                return image;
            if (image.status !== "CREATING") {
                throw new KilnError(409, "ImageFailed", `image ${imageIdentifier} is ${image.status}: ${image.statusReason ?? ""}`);
            }
            if (Date.now() > deadline) {
                throw new KilnError(408, "Timeout", `image ${imageIdentifier} is still CREATING after ${timeoutMs} ms`);
            }
            await sleep(500);
        }
    }
    // -- microVMs ----------------------------------------------------------------------------
    async runMicrovm(req) {
        return this.http.call("POST", "/v1/microvms", { json: req });
    }
    async getMicrovm(microvmIdentifier) {
        return this.http.call("GET", `/v1/microvms/${seg(microvmIdentifier)}`);
    }
    async listMicrovms(query = {}) {
        return this.http.call("GET", "/v1/microvms", { query });
    }
    /** The microVM once it is in `state` (or TERMINATED); a KilnError when time ran out first. */
    async waitMicrovm(microvmIdentifier, state = "RUNNING", timeoutMs = 180_000) {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
            const seconds = Math.max(1, Math.min(60, Math.ceil((deadline - Date.now()) / 1000)));
            const vm = await this.http.call("GET", `/v1/microvms/${seg(microvmIdentifier)}`, {
                query: { waitFor: state, timeoutSeconds: seconds },
            });
            if (vm.state === state)
                return vm;
            if (vm.state === "TERMINATED") {
                throw new KilnError(409, "Terminated", `microVM ${microvmIdentifier} is TERMINATED: ${vm.stateReason ?? ""}`);
            }
            if (Date.now() > deadline) {
                throw new KilnError(408, "Timeout", `microVM ${microvmIdentifier} is ${vm.state}, not ${state}, after ${timeoutMs} ms`);
            }
        }
    }
    /** Sets labels (a value) and removes them (`null`); the others are kept. */
    async updateMicrovm(microvmIdentifier, labels) {
        return this.http.call("PATCH", `/v1/microvms/${seg(microvmIdentifier)}`, { json: { labels } });
    }
    /** Sets and removes an image's labels, as updateMicrovm does. */
    async updateMicrovmImage(imageIdentifier, labels) {
        return this.http.call("PATCH", `/v1/images/${seg(imageIdentifier)}`, { json: { labels } });
    }
    /** The microVM's metrics history, oldest first (the newest is also in getMicrovm's `metrics`). */
    async getMicrovmMetrics(microvmIdentifier, sinceMs) {
        return this.http.call("GET", `/v1/microvms/${seg(microvmIdentifier)}/metrics`, { query: { sinceMs } });
    }
    /** `count` copies of a RUNNING microVM (memory, processes, disk), on their way to RUNNING. */
    async forkMicrovm(microvmIdentifier, count = 1) {
        return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/fork`, { json: { count } });
    }
    async suspendMicrovm(microvmIdentifier) {
        return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/suspend`, { json: {} });
    }
    async resumeMicrovm(microvmIdentifier) {
        return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/resume`, { json: {} });
    }
    async terminateMicrovm(microvmIdentifier) {
        return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/terminate`, { json: {} });
    }
    /** A command's whole output at its end (8 MiB at most): see startProcess for streaming. */
    async exec(microvmIdentifier, command, timeoutSeconds) {
        return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/exec`, { json: { command, timeoutSeconds } });
    }
    async createMicrovmAuthToken(req) {
        return this.http.call("POST", "/v1/auth-tokens", { json: req });
    }
    /** Revokes every token of a microVM (a Sandbox then gets a fresh one by itself). */
    async revokeMicrovmAuthTokens(microvmIdentifier) {
        await this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/revoke-tokens`, { json: {} });
    }
    async ingressInfo() {
        return this.http.call("GET", "/v1/ingress");
    }
    // -- webhooks ----------------------------------------------------------------------------
    /** Registers `url` for lifecycle events; the answer's `secret` (shown once) checks deliveries (verifyWebhook). */
    async createWebhook(req) {
        return this.http.call("POST", "/v1/webhooks", { json: req });
    }
    /** ListNodes: the kilnd nodes sharing the database (this one alone without a cluster). */
    async listNodes() {
        return this.http.call("GET", "/v1/nodes");
    }
    /** DrainNode: the node suspends its microVMs and hands them to other nodes. */
    async drainNode(name) {
        return this.http.call("POST", `/v1/nodes/${encodeURIComponent(name)}/drain`);
    }
    /** UndrainNode: the node takes microVMs again. */
    async undrainNode(name) {
        return this.http.call("POST", `/v1/nodes/${encodeURIComponent(name)}/undrain`);
    }
    /** RemoveNode: forgets a node that is gone for good and holds no microVM. */
    async removeNode(name) {
        await this.http.call("DELETE", `/v1/nodes/${encodeURIComponent(name)}`);
    }
    async listWebhooks() {
        return this.http.call("GET", "/v1/webhooks");
    }
    async deleteWebhook(webhookId) {
        await this.http.call("DELETE", `/v1/webhooks/${seg(webhookId)}`);
    }
    /** The newest deliveries, newest first. */
    async listWebhookDeliveries(webhookId) {
        return this.http.call("GET", `/v1/webhooks/${seg(webhookId)}/deliveries`);
    }
    // -- files -------------------------------------------------------------------------------
    #files(id, rest = "") {
        return `/v1/microvms/${seg(id)}/files${rest}`;
    }
    async listFiles(id, path, opts = {}) {
        return this.http.call("GET", this.#files(id), { query: { path, ...opts } });
    }
    async statFile(id, path, opts = {}) {
        return this.http.call("GET", this.#files(id, "/stat"), { query: { path, ...opts } });
    }
    async readFile(id, path, opts = {}) {
        const resp = await this.http.request("GET", this.#files(id, "/content"), { query: { path, ...opts } });
        return new Uint8Array(await resp.arrayBuffer());
    }
    /** Writes a file atomically (the old one stays whole until the new one is complete). */
    async writeFile(id, path, data, opts = {}) {
        const body = typeof data === "string" ? new TextEncoder().encode(data) : data;
        return this.http.call("PUT", this.#files(id, "/content"), { query: { path, ...opts }, body });
    }
    async makeDirectory(id, path, opts = {}) {
        return this.http.call("POST", this.#files(id, "/mkdir"), { json: { path, ...opts } });
    }
    async moveFile(id, from, to, opts = {}) {
        return this.http.call("POST", this.#files(id, "/move"), { json: { from, to, ...opts } });
    }
    async removeFile(id, path, opts = {}) {
        await this.http.call("DELETE", this.#files(id), { query: { path, ...opts } });
    }
    /** A directory as a tar stream's bytes. */
    async downloadArchive(id, path, opts = {}) {
        const resp = await this.http.request("GET", this.#files(id, "/archive"), { query: { path, ...opts } });
        return new Uint8Array(await resp.arrayBuffer());
    }
    /** Unpacks a tar stream under `path`. */
    async uploadArchive(id, path, tar, opts = {}) {
        await this.http.call("PUT", this.#files(id, "/archive"), { query: { path, ...opts }, body: tar, contentType: "application/x-tar" });
    }
    /** Changes in a directory as they happen; `return()` (or `break`) ends the watch. */
    async watchFiles(id, path, opts = {}) {
        const abort = new AbortController();
        const resp = await this.http.request("GET", this.#files(id, "/watch"), { query: { path, ...opts }, signal: abort.signal });
        async function* watch() {
            try {
                for await (const ev of events(resp.body)) {
                    if (ev.event === "file")
                        yield JSON.parse(ev.data);
                    else if (ev.event === "error")
                        throw new KilnError(409, "WatchEnded", ev.data);
                    else if (ev.event === "end")
                        return;
                }
            }
            finally {
                abort.abort();
            }
        }
        return watch();
    }
    // -- processes ---------------------------------------------------------------------------
    #procs(id, rest = "") {
        return `/v1/microvms/${seg(id)}/processes${rest}`;
    }
    /** Starts a process that runs on its own (`command` or `shell`); answers at once. */
    async startProcess(id, req) {
        return this.http.call("POST", this.#procs(id), { json: req });
    }
    async listProcesses(id, query = {}) {
        return this.http.call("GET", this.#procs(id), { query });
    }
    async getProcess(id, pid, opts = {}) {
        return this.http.call("GET", this.#procs(id, `/${pid}`), { query: opts });
    }
    /** The process once it exited. */
    async waitProcess(id, pid, timeoutMs = 300_000) {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
            const waitSeconds = Math.max(1, Math.min(60, Math.ceil((deadline - Date.now()) / 1000)));
            const p = await this.getProcess(id, pid, { waitSeconds });
            if (!p.running)
                return p;
            if (Date.now() > deadline)
                throw new KilnError(408, "Timeout", `process ${pid} still runs after ${timeoutMs} ms`);
        }
    }
    /** The process's output from byte `from` on, as it comes. */
    async processOutput(id, pid, opts = {}) {
        const abort = new AbortController();
        const from = opts.from ?? 0;
        const resp = await this.http.request("GET", this.#procs(id, `/${pid}/output`), { query: { from }, signal: abort.signal });
        return new ProcessOutput(resp, from, abort);
    }
    /** Writes to its stdin (at most 1 MiB; a string is UTF-8); `eof` then closes it. */
    async writeProcessStdin(id, pid, data, opts = {}) {
        const body = typeof data === "string" ? new TextEncoder().encode(data) : data;
        await this.http.call("POST", this.#procs(id, `/${pid}/stdin`), { body, query: { eof: opts.eof || undefined } });
    }
    /** A signal (a name such as "TERM" or a number) for its process group. */
    async signalProcess(id, pid, signal = "TERM") {
        await this.http.call("POST", this.#procs(id, `/${pid}/signal`), { json: { signal: String(signal) } });
    }
    async resizeProcess(id, pid, size) {
        await this.http.call("POST", this.#procs(id, `/${pid}/resize`), { json: size });
    }
}
