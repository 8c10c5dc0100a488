/**
 * kilnd's control API with the seed's calls (runMicrovm, createMicrovmAuthToken,
 * terminateMicrovm, the image calls, …), the files API and the processes API. Requests and
 * responses are the types generated from spec/openapi.yaml (`api.ts`).
 */
import type { components } from "./api.js";
import { KilnError } from "./errors.js";
import { events } from "./sse.js";
import { type ClientOptions, seg, Transport } from "./transport.js";

type S = components["schemas"];
export type Image = S["Image"];
export type Microvm = S["Microvm"];
export type MicrovmState = S["MicrovmState"];
export type RunMicrovmRequest = S["RunMicrovmRequest"];
export type RunMicrovmResponse = S["RunMicrovmResponse"];
export type CreateImageRequest = S["CreateImageRequest"];
export type CreateTokenRequest = S["CreateTokenRequest"];
export type CreateTokenResponse = S["CreateTokenResponse"];
export type IngressInfo = S["IngressInfo"];
export type ExecResponse = S["ExecResponse"];
export type FileEntry = S["FileEntry"];
export type FileList = S["FileList"];
export type FileEvent = S["FileEvent"];
export type Process = S["Process"];
export type ProcessList = S["ProcessList"];
export type StartProcessRequest = S["StartProcessRequest"];
export type TerminalSize = S["TerminalSize"];

/** CreateMicrovmImage's request; `codeArtifact` may carry the archive's bytes, uploaded first. */
export type CreateImageInput = Omit<CreateImageRequest, "codeArtifact"> & {
  codeArtifact: { artifactId: string } | { bytes: Uint8Array; format?: "tar" | "zip" };
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Bytes of a process's output at `offset` of its whole output (stdout and stderr together). */
export interface OutputChunk {
  stream: "stdout" | "stderr";
  offset: number;
  data: Uint8Array;
}

/**
 * A process's output as it comes: iterate it for {@link OutputChunk}s; after the last,
 * `exit` is the process as it exited. A suspend or stop ends it with a KilnError
 * (`OutputEnded`): open it again from `position` after a resume. `close()` detaches.
 */
export class ProcessOutput implements AsyncIterable<OutputChunk> {
  position: number;
  exit?: Process;
  readonly #resp: Response;
  readonly #abort: AbortController;

  constructor(resp: Response, from: number, abort: AbortController) {
    this.#resp = resp;
    this.position = from;
    this.#abort = abort;
  }

  close(): void {
    this.#abort.abort();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<OutputChunk> {
    if (!this.#resp.body) return;
    for await (const ev of events(this.#resp.body)) {
      if (ev.event === "output") {
        const v = JSON.parse(ev.data) as S["ProcessOutputEvent"];
        const data = new Uint8Array(Buffer.from(v.data, "base64"));
        this.position = v.offset + data.length;
        yield { stream: v.stream, offset: v.offset, data };
      } else if (ev.event === "exit") {
        this.exit = JSON.parse(ev.data) as Process;
        return;
      } else if (ev.event === "error") {
        throw new KilnError(409, "OutputEnded", ev.data);
      }
    }
  }

  /** Every remaining byte until the exit, as text. */
  async text(): Promise<string> {
    const parts: Uint8Array[] = [];
    for await (const c of this) parts.push(c.data);
    return Buffer.concat(parts).toString("utf8");
  }
}

export class Client {
  readonly http: Transport;

  constructor(opts: ClientOptions = {}) {
    this.http = new Transport(opts);
  }

  get endpoint(): string {
    return this.http.endpoint;
  }

  // -- images ------------------------------------------------------------------------------
  async uploadArtifact(bytes: Uint8Array, format: "tar" | "zip" = "tar"): Promise<S["Artifact"]> {
    const contentType = format === "zip" ? "application/zip" : "application/x-tar";
    return this.http.call("POST", "/v1/artifacts", { body: bytes, contentType });
  }

  async createMicrovmImage(req: CreateImageInput): Promise<S["CreateImageResponse"]> {
    let codeArtifact = req.codeArtifact;
    if ("bytes" in codeArtifact) {
      const art = await this.uploadArtifact(codeArtifact.bytes, codeArtifact.format);
      codeArtifact = { artifactId: art.artifactId };
    }
    return this.http.call("POST", "/v1/images", { json: { ...req, codeArtifact } });
  }

  async getMicrovmImage(imageIdentifier: string): Promise<Image> {
    return this.http.call("GET", `/v1/images/${seg(imageIdentifier)}`);
  }

  async listMicrovmImages(query: { status?: string; label?: string[]; limit?: number; cursor?: string } = {}): Promise<S["ImageList"]> {
    return this.http.call("GET", "/v1/images", { query });
  }

  async deleteMicrovmImage(imageIdentifier: string): Promise<void> {
    await this.http.call("DELETE", `/v1/images/${seg(imageIdentifier)}`);
  }

  /** The image once it is no longer CREATING; a KilnError when it FAILED or time ran out. */
  async waitMicrovmImage(imageIdentifier: string, timeoutMs = 600_000): Promise<Image> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const image = await this.getMicrovmImage(imageIdentifier);
      if (image.status === "SUCCESSFUL") return image;
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
  async runMicrovm(req: RunMicrovmRequest): Promise<RunMicrovmResponse> {
    return this.http.call("POST", "/v1/microvms", { json: req });
  }

  async getMicrovm(microvmIdentifier: string): Promise<Microvm> {
    return this.http.call("GET", `/v1/microvms/${seg(microvmIdentifier)}`);
  }

  async listMicrovms(query: { state?: MicrovmState; image?: string; label?: string[]; limit?: number; cursor?: string } = {}): Promise<S["MicrovmList"]> {
    return this.http.call("GET", "/v1/microvms", { query });
  }

  /** The microVM once it is in `state` (or TERMINATED); a KilnError when time ran out first. */
  async waitMicrovm(microvmIdentifier: string, state: MicrovmState = "RUNNING", timeoutMs = 180_000): Promise<Microvm> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const seconds = Math.max(1, Math.min(60, Math.ceil((deadline - Date.now()) / 1000)));
      const vm = await this.http.call<Microvm>("GET", `/v1/microvms/${seg(microvmIdentifier)}`, {
        query: { waitFor: state, timeoutSeconds: seconds },
      });
      if (vm.state === state) return vm;
      if (vm.state === "TERMINATED") {
        throw new KilnError(409, "Terminated", `microVM ${microvmIdentifier} is TERMINATED: ${vm.stateReason ?? ""}`);
      }
      if (Date.now() > deadline) {
        throw new KilnError(408, "Timeout", `microVM ${microvmIdentifier} is ${vm.state}, not ${state}, after ${timeoutMs} ms`);
      }
    }
  }

  /** Sets labels (a value) and removes them (`null`); the others are kept. */
  async updateMicrovm(microvmIdentifier: string, labels: Record<string, string | null>): Promise<Microvm> {
    return this.http.call("PATCH", `/v1/microvms/${seg(microvmIdentifier)}`, { json: { labels } });
  }

  /** Sets and removes an image's labels, as updateMicrovm does. */
  async updateMicrovmImage(imageIdentifier: string, labels: Record<string, string | null>): Promise<Image> {
    return this.http.call("PATCH", `/v1/images/${seg(imageIdentifier)}`, { json: { labels } });
  }

  /** The microVM's metrics history, oldest first (the newest is also in getMicrovm's `metrics`). */
  async getMicrovmMetrics(microvmIdentifier: string, sinceMs?: number): Promise<S["MicrovmMetricsHistory"]> {
    return this.http.call("GET", `/v1/microvms/${seg(microvmIdentifier)}/metrics`, { query: { sinceMs } });
  }

  /** `count` copies of a RUNNING microVM (memory, processes, disk), on their way to RUNNING. */
  async forkMicrovm(microvmIdentifier: string, count = 1): Promise<S["ForkMicrovmResponse"]> {
    return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/fork`, { json: { count } });
  }

  async suspendMicrovm(microvmIdentifier: string): Promise<Microvm> {
    return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/suspend`, { json: {} });
  }

  async resumeMicrovm(microvmIdentifier: string): Promise<Microvm> {
    return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/resume`, { json: {} });
  }

  async terminateMicrovm(microvmIdentifier: string): Promise<Microvm> {
    return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/terminate`, { json: {} });
  }

  /** A command's whole output at its end (8 MiB at most): see startProcess for streaming. */
  async exec(microvmIdentifier: string, command: string[], timeoutSeconds?: number): Promise<ExecResponse> {
    return this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/exec`, { json: { command, timeoutSeconds } });
  }

  async createMicrovmAuthToken(req: CreateTokenRequest): Promise<CreateTokenResponse> {
    return this.http.call("POST", "/v1/auth-tokens", { json: req });
  }

  /** Revokes every token of a microVM (a Sandbox then gets a fresh one by itself). */
  async revokeMicrovmAuthTokens(microvmIdentifier: string): Promise<void> {
    await this.http.call("POST", `/v1/microvms/${seg(microvmIdentifier)}/revoke-tokens`, { json: {} });
  }

  async ingressInfo(): Promise<IngressInfo> {
    return this.http.call("GET", "/v1/ingress");
  }

  // -- webhooks ----------------------------------------------------------------------------
  /** Registers `url` for lifecycle events; the answer's `secret` (shown once) checks deliveries (verifyWebhook). */
  async createWebhook(req: S["CreateWebhookRequest"]): Promise<S["Webhook"]> {
    return this.http.call("POST", "/v1/webhooks", { json: req });
  }

  /** ListNodes: the kilnd nodes sharing the database (this one alone without a cluster). */
  async listNodes(): Promise<S["NodeList"]> {
    return this.http.call("GET", "/v1/nodes");
  }

  /** DrainNode: the node suspends its microVMs and hands them to other nodes. */
  async drainNode(name: string): Promise<S["Node"]> {
    return this.http.call("POST", `/v1/nodes/${encodeURIComponent(name)}/drain`);
  }

  /** UndrainNode: the node takes microVMs again. */
  async undrainNode(name: string): Promise<S["Node"]> {
    return this.http.call("POST", `/v1/nodes/${encodeURIComponent(name)}/undrain`);
  }

  /** RemoveNode: forgets a node that is gone for good and holds no microVM. */
  async removeNode(name: string): Promise<void> {
    await this.http.call("DELETE", `/v1/nodes/${encodeURIComponent(name)}`);
  }

  async listWebhooks(): Promise<S["WebhookList"]> {
    return this.http.call("GET", "/v1/webhooks");
  }

  async deleteWebhook(webhookId: string): Promise<void> {
    await this.http.call("DELETE", `/v1/webhooks/${seg(webhookId)}`);
  }

  /** The newest deliveries, newest first. */
  async listWebhookDeliveries(webhookId: string): Promise<S["DeliveryList"]> {
    return this.http.call("GET", `/v1/webhooks/${seg(webhookId)}/deliveries`);
  }

  // -- files -------------------------------------------------------------------------------
  #files(id: string, rest = ""): string {
    return `/v1/microvms/${seg(id)}/files${rest}`;
  }

  async listFiles(id: string, path: string, opts: { user?: string; limit?: number } = {}): Promise<FileList> {
    return this.http.call("GET", this.#files(id), { query: { path, ...opts } });
  }

  async statFile(id: string, path: string, opts: { user?: string } = {}): Promise<FileEntry> {
    return this.http.call("GET", this.#files(id, "/stat"), { query: { path, ...opts } });
  }

  async readFile(id: string, path: string, opts: { user?: string } = {}): Promise<Uint8Array> {
    const resp = await this.http.request("GET", this.#files(id, "/content"), { query: { path, ...opts } });
    return new Uint8Array(await resp.arrayBuffer());
  }

  /** Writes a file atomically (the old one stays whole until the new one is complete). */
  async writeFile(id: string, path: string, data: Uint8Array | string,
    opts: { user?: string; mode?: string; createParents?: boolean } = {}): Promise<FileEntry> {
    const body = typeof data === "string" ? new TextEncoder().encode(data) : data;
    return this.http.call("PUT", this.#files(id, "/content"), { query: { path, ...opts }, body });
  }

  async makeDirectory(id: string, path: string, opts: { user?: string; mode?: string; parents?: boolean } = {}): Promise<FileEntry> {
    return this.http.call("POST", this.#files(id, "/mkdir"), { json: { path, ...opts } });
  }

  async moveFile(id: string, from: string, to: string, opts: { user?: string } = {}): Promise<FileEntry> {
    return this.http.call("POST", this.#files(id, "/move"), { json: { from, to, ...opts } });
  }

  async removeFile(id: string, path: string, opts: { user?: string; recursive?: boolean } = {}): Promise<void> {
    await this.http.call("DELETE", this.#files(id), { query: { path, ...opts } });
  }

  /** A directory as a tar stream's bytes. */
  async downloadArchive(id: string, path: string, opts: { user?: string } = {}): Promise<Uint8Array> {
    const resp = await this.http.request("GET", this.#files(id, "/archive"), { query: { path, ...opts } });
    return new Uint8Array(await resp.arrayBuffer());
  }

  /** Unpacks a tar stream under `path`. */
  async uploadArchive(id: string, path: string, tar: Uint8Array, opts: { user?: string } = {}): Promise<void> {
    await this.http.call("PUT", this.#files(id, "/archive"), { query: { path, ...opts }, body: tar, contentType: "application/x-tar" });
  }

  /** Changes in a directory as they happen; `return()` (or `break`) ends the watch. */
  async watchFiles(id: string, path: string, opts: { user?: string } = {}): Promise<AsyncGenerator<FileEvent>> {
    const abort = new AbortController();
    const resp = await this.http.request("GET", this.#files(id, "/watch"), { query: { path, ...opts }, signal: abort.signal });
    async function* watch(): AsyncGenerator<FileEvent> {
      try {
        for await (const ev of events(resp.body!)) {
          if (ev.event === "file") yield JSON.parse(ev.data) as FileEvent;
          else if (ev.event === "error") throw new KilnError(409, "WatchEnded", ev.data);
          else if (ev.event === "end") return;
        }
      } finally {
        abort.abort();
      }
    }
    return watch();
  }

  // -- processes ---------------------------------------------------------------------------
  #procs(id: string, rest = ""): string {
    return `/v1/microvms/${seg(id)}/processes${rest}`;
  }

  /** Starts a process that runs on its own (`command` or `shell`); answers at once. */
  async startProcess(id: string, req: StartProcessRequest): Promise<Process> {
    return this.http.call("POST", this.#procs(id), { json: req });
  }

  async listProcesses(id: string, query: { running?: boolean; tag?: string; limit?: number; cursor?: string } = {}): Promise<ProcessList> {
    return this.http.call("GET", this.#procs(id), { query });
  }

  async getProcess(id: string, pid: number, opts: { waitSeconds?: number } = {}): Promise<Process> {
    return this.http.call("GET", this.#procs(id, `/${pid}`), { query: opts });
  }

  /** The process once it exited. */
  async waitProcess(id: string, pid: number, timeoutMs = 300_000): Promise<Process> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const waitSeconds = Math.max(1, Math.min(60, Math.ceil((deadline - Date.now()) / 1000)));
      const p = await this.getProcess(id, pid, { waitSeconds });
      if (!p.running) return p;
      if (Date.now() > deadline) throw new KilnError(408, "Timeout", `process ${pid} still runs after ${timeoutMs} ms`);
    }
  }

  /** The process's output from byte `from` on, as it comes. */
  async processOutput(id: string, pid: number, opts: { from?: number } = {}): Promise<ProcessOutput> {
    const abort = new AbortController();
    const from = opts.from ?? 0;
    const resp = await this.http.request("GET", this.#procs(id, `/${pid}/output`), { query: { from }, signal: abort.signal });
    return new ProcessOutput(resp, from, abort);
  }

  /** Writes to its stdin (at most 1 MiB; a string is UTF-8); `eof` then closes it. */
  async writeProcessStdin(id: string, pid: number, data: Uint8Array | string, opts: { eof?: boolean } = {}): Promise<void> {
    const body = typeof data === "string" ? new TextEncoder().encode(data) : data;
    await this.http.call("POST", this.#procs(id, `/${pid}/stdin`), { body, query: { eof: opts.eof || undefined } });
  }

  /** A signal (a name such as "TERM" or a number) for its process group. */
  async signalProcess(id: string, pid: number, signal: string | number = "TERM"): Promise<void> {
    await this.http.call("POST", this.#procs(id, `/${pid}/signal`), { json: { signal: String(signal) } });
  }

  async resizeProcess(id: string, pid: number, size: TerminalSize): Promise<void> {
    await this.http.call("POST", this.#procs(id, `/${pid}/resize`), { json: size });
  }
}
