/**
 * A microVM for as long as you use it, with requests to its app that create and refresh
 * their tokens themselves, and its files and processes one call away.
 */
import { Client } from "./client.js";
import { KilnError } from "./errors.js";
/** Renew a token this long before it expires. */
const REFRESH_MARGIN_MS = 30_000;
export class Sandbox {
    client;
    microvmId;
    /** Where its app is reached, as RunMicrovm returned it. */
    endpoint;
    port;
    #tokenMinutes;
    #tokens = new Map();
    #scheme;
    constructor(client, microvmId, endpoint, port, tokenMinutes) {
        this.client = client;
        this.microvmId = microvmId;
        this.endpoint = endpoint;
        this.port = port;
        this.#tokenMinutes = tokenMinutes;
    }
    /** Runs a microVM of `image` and waits until it is RUNNING (terminating it if that fails). */
    static async create(image, opts = {}) {
        const { client = new Client(), port = 8080, tokenMinutes = 5, startTimeoutMs = 180_000, ...run } = opts;
        const vm = await client.runMicrovm({ ...run, imageIdentifier: image });
        const sb = new Sandbox(client, vm.microvmId, vm.endpoint, port, tokenMinutes);
        try {
            await client.waitMicrovm(vm.microvmId, "RUNNING", startTimeoutMs);
        }
        catch (e) {
            await sb.terminate();
            throw e;
        }
        return sb;
    }
    /** Terminates it (memory, disk, processes); safe to call twice. */
    async terminate() {
        try {
            await this.client.terminateMicrovm(this.microvmId);
        }
        catch (e) {
            if (!(e instanceof KilnError && (e.status === 404 || e.status === 409)))
                throw e;
        }
    }
    /** A token for `port`, reused until shortly before it expires. */
    async token(port = this.port, fresh = false) {
        const cached = this.#tokens.get(port);
        if (!fresh && cached && Date.now() < cached.expiresMs - REFRESH_MARGIN_MS)
            return cached.token;
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
    async fetch(path, init = {}) {
        const { port = this.port, ...rest } = init;
        this.#scheme ??= (await this.client.ingressInfo()).tls ? "https" : "http";
        const url = `${this.#scheme}://${this.endpoint}${path}`;
        let resp;
        for (const fresh of [false, true]) {
            const headers = new Headers(rest.headers);
            headers.set("X-Kiln-Auth", await this.token(port, fresh));
            headers.set("X-Kiln-Port", String(port));
            resp = await fetch(url, { ...rest, headers });
            if (resp.status !== 401)
                return resp;
            await resp.body?.cancel();
        }
        return resp;
    }
    // -- files -------------------------------------------------------------------------------
    readFile(path, opts) {
        return this.client.readFile(this.microvmId, path, opts);
    }
    writeFile(path, data, opts) {
        return this.client.writeFile(this.microvmId, path, data, opts);
    }
    listFiles(path, opts) {
        return this.client.listFiles(this.microvmId, path, opts);
    }
    // -- processes ---------------------------------------------------------------------------
    startProcess(req) {
        return this.client.startProcess(this.microvmId, req);
    }
    processOutput(pid, opts) {
        return this.client.processOutput(this.microvmId, pid, opts);
    }
    writeProcessStdin(pid, data, opts) {
        return this.client.writeProcessStdin(this.microvmId, pid, data, opts);
    }
    signalProcess(pid, signal = "TERM") {
        return this.client.signalProcess(this.microvmId, pid, signal);
    }
    waitProcess(pid, timeoutMs) {
        return this.client.waitProcess(this.microvmId, pid, timeoutMs);
    }
}
