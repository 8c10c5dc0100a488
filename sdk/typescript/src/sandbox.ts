/**
 * A microVM for as long as you use it, with requests to its app that create and refresh
 * their tokens themselves, and its files and processes one call away.
 */
import { Client, type FileEntry, type Process, type ProcessOutput, type RunMicrovmRequest, type StartProcessRequest } from "./client.js";
import { KilnError } from "./errors.js";

/** Renew a token this long before it expires. */
const REFRESH_MARGIN_MS = 30_000;

export interface SandboxOptions extends Partial<Omit<RunMicrovmRequest, "imageIdentifier">> {
  client?: Client;
  /** The app port requests go to by default (8080). */
  port?: number;
  /** Lifetime of the tokens it creates (default 5 minutes). */
  tokenMinutes?: number;
  /** How long to wait for RUNNING (default 180 s). */
  startTimeoutMs?: number;
}

export class Sandbox {
  readonly client: Client;
  readonly microvmId: string;
  /** Where its app is reached, as RunMicrovm returned it. */
  readonly endpoint: string;
  readonly port: number;
  readonly #tokenMinutes: number;
  readonly #tokens = new Map<number, { token: string; expiresMs: number }>();
  #scheme?: string;

  private constructor(client: Client, microvmId: string, endpoint: string, port: number, tokenMinutes: number) {
    this.client = client;
    this.microvmId = microvmId;
    this.endpoint = endpoint;
    this.port = port;
    this.#tokenMinutes = tokenMinutes;
  }

  /** Runs a microVM of `image` and waits until it is RUNNING (terminating it if that fails). */
  static async create(image: string, opts: SandboxOptions = {}): Promise<Sandbox> {
    const { client = new Client(), port = 8080, tokenMinutes = 5, startTimeoutMs = 180_000, ...run } = opts;
    const vm = await client.runMicrovm({ ...run, imageIdentifier: image });
    const sb = new Sandbox(client, vm.microvmId, vm.endpoint, port, tokenMinutes);
    try {
      await client.waitMicrovm(vm.microvmId, "RUNNING", startTimeoutMs);
    } catch (e) {
      await sb.terminate();
      throw e;
    }
    return sb;
  }

  /** Terminates it (memory, disk, processes); safe to call twice. */
  async terminate(): Promise<void> {
    try {
      await this.client.terminateMicrovm(this.microvmId);
    } catch (e) {
      if (!(e instanceof KilnError && (e.status === 404 || e.status === 409))) throw e;
    }
  }

  /** A token for `port`, reused until shortly before it expires. */
  async token(port = this.port, fresh = false): Promise<string> {
    const cached = this.#tokens.get(port);
    if (!fresh && cached && Date.now() < cached.expiresMs - REFRESH_MARGIN_MS) return cached.token;
    const answer = await this.client.createMicrovmAuthToken({
      microvmIdentifier: this.microvmId,
      expirationInMinutes: this.#tokenMinutes,
      allowedPorts: [{ port }],
    });
    const token = answer.authToken["X-Kiln-Auth"];
    this.#tokens.set(port, { token, expiresMs: answer.expiresAt * 1000 });
    return token;
  }

  /**
   * A request to the app (`path` on `port`, default the sandbox's), through the ingress with
   * a token; a 401 (expired or revoked) is retried once with a new one.
   */
  async fetch(path: string, init: RequestInit & { port?: number } = {}): Promise<Response> {
    const { port = this.port, ...rest } = init;
    this.#scheme ??= (await this.client.ingressInfo()).tls ? "https" : "http";
    const url = `${this.#scheme}://${this.endpoint}${path}`;
    let resp: Response | undefined;
    for (const fresh of [false, true]) {
      const headers = new Headers(rest.headers);
      headers.set("X-Kiln-Auth", await this.token(port, fresh));
      headers.set("X-Kiln-Port", String(port));
      resp = await fetch(url, { ...rest, headers });
      if (resp.status !== 401) return resp;
      await resp.body?.cancel();
    }
    return resp!;
  }

  // -- files -------------------------------------------------------------------------------
  readFile(path: string, opts?: { user?: string }): Promise<Uint8Array> {
    return this.client.readFile(this.microvmId, path, opts);
  }

  writeFile(path: string, data: Uint8Array | string, opts?: { user?: string; mode?: string; createParents?: boolean }): Promise<FileEntry> {
    return this.client.writeFile(this.microvmId, path, data, opts);
  }

  listFiles(path: string, opts?: { user?: string; limit?: number }) {
    return this.client.listFiles(this.microvmId, path, opts);
  }

  // -- processes ---------------------------------------------------------------------------
  startProcess(req: StartProcessRequest): Promise<Process> {
    return this.client.startProcess(this.microvmId, req);
  }

  processOutput(pid: number, opts?: { from?: number }): Promise<ProcessOutput> {
    return this.client.processOutput(this.microvmId, pid, opts);
  }

  writeProcessStdin(pid: number, data: Uint8Array | string, opts?: { eof?: boolean }): Promise<void> {
    return this.client.writeProcessStdin(this.microvmId, pid, data, opts);
  }

  signalProcess(pid: number, signal: string | number = "TERM"): Promise<void> {
    return this.client.signalProcess(this.microvmId, pid, signal);
  }

  waitProcess(pid: number, timeoutMs?: number): Promise<Process> {
    return this.client.waitProcess(this.microvmId, pid, timeoutMs);
  }
}
