/** How the client reaches kilnd: its address, its key, and one request with errors typed. */
import { existsSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { KilnError } from "./errors.js";
function defaultHome() {
    if (process.env.KILN_HOME)
        return process.env.KILN_HOME;
    return existsSync("/var/lib/kiln") ? "/var/lib/kiln" : join(homedir(), ".kiln");
}
/** `?a=1&label=x&label=y` of the parameters given (arrays repeat their key). */
export function queryString(query) {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query ?? {})) {
        if (value === undefined || value === null)
            continue;
        for (const v of Array.isArray(value) ? value : [value])
            params.append(key, String(v));
    }
    const text = params.toString();
    return text ? `?${text}` : "";
}
export class Transport {
    endpoint;
    #key;
    constructor(opts = {}) {
        const home = opts.home ?? defaultHome();
        let endpoint = opts.endpoint ?? process.env.KILN_ENDPOINT;
        if (endpoint === undefined) {
            const addr = join(home, "kilnd.addr");
            if (existsSync(addr)) {
                const text = readFileSync(addr, "utf8").trim();
                endpoint = text.includes("://") ? text : `http://${text}`;
            }
            else {
                endpoint = "http://127.0.0.1:7070";
            }
        }
        let key = opts.apiKey ?? process.env.KILN_API_KEY;
        if (key === undefined) {
            const file = join(home, "api-key");
            if (!existsSync(file)) {
                throw new KilnError(401, "NoKey", `no API key: set KILN_API_KEY or KILN_HOME (looked for ${file})`);
            }
            key = readFileSync(file, "utf8").trim();
        }
        this.endpoint = endpoint.replace(/\/+$/, "");
        this.#key = key;
    }
    /** One request; a status that is not 2xx is thrown as a {@link KilnError}. */
    async request(method, path, opts = {}) {
        const headers = { Authorization: `Bearer ${this.#key}` };
        let body = opts.body;
        if (opts.json !== undefined) {
            body = JSON.stringify(opts.json);
            headers["Content-Type"] = "application/json";
        }
        else if (body !== undefined) {
            headers["Content-Type"] = opts.contentType ?? "application/octet-stream";
        }
        const url = `${this.endpoint}${path}${queryString(opts.query)}`;
        let resp;
        try {
            resp = await fetch(url, { method, headers, body: body, signal: opts.signal });
        }
        catch (e) {
            const why = e instanceof Error ? (e.cause instanceof Error ? e.cause.message : e.message) : String(e);
            throw new KilnError(0, "Unreachable", `cannot reach kilnd at ${this.endpoint}: ${why} (is it running?)`);
        }
        if (!resp.ok)
            throw await KilnError.from(resp);
        return resp;
    }
    /** A request answered with JSON (or nothing, for a 204). */
    async call(method, path, opts = {}) {
        const resp = await this.request(method, path, opts);
        const text = await resp.text();
        return (text ? JSON.parse(text) : undefined);
    }
}
/** A path segment, escaped. */
export const seg = (s) => encodeURIComponent(String(s));
