/** How the client reaches kilnd: its address, its key, and one request with errors typed. */
import { existsSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

import { KilnError } from "./errors.js";

export interface ClientOptions {
  /** kilnd's API, e.g. `http://127.0.0.1:7070` (default: `KILN_ENDPOINT`, else `$KILN_HOME/kilnd.addr`). */
  endpoint?: string;
  /** The API key (default: `KILN_API_KEY`, else `$KILN_HOME/api-key`). */
  apiKey?: string;
  /** kiln's home (default: `KILN_HOME`, else `/var/lib/kiln` when it exists, else `~/.kiln`). */
  home?: string;
}

export interface RequestOptions {
  json?: unknown;
  body?: Uint8Array | string;
  contentType?: string;
  query?: Record<string, string | number | boolean | string[] | undefined | null>;
  signal?: AbortSignal;
}

function defaultHome(): string {
  if (process.env.KILN_HOME) return process.env.KILN_HOME;
  return existsSync("/var/lib/kiln") ? "/var/lib/kiln" : join(homedir(), ".kiln");
}

/** `?a=1&label=x&label=y` of the parameters given (arrays repeat their key). */
export function queryString(query: RequestOptions["query"]): string {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query ?? {})) {
    if (value === undefined || value === null) continue;
    for (const v of Array.isArray(value) ? value : [value]) params.append(key, String(v));
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

export class Transport {
  readonly endpoint: string;
  readonly #key: string;

  constructor(opts: ClientOptions = {}) {
    const home = opts.home ?? defaultHome();
    let endpoint = opts.endpoint ?? process.env.KILN_ENDPOINT;
    if (endpoint === undefined) {
      const addr = join(home, "kilnd.addr");
      if (existsSync(addr)) {
        const text = readFileSync(addr, "utf8").trim();
        endpoint = text.includes("://") ? text : `http://${text}`;
      } else {
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
  async request(method: string, path: string, opts: RequestOptions = {}): Promise<Response> {
    const headers: Record<string, string> = { Authorization: `Bearer ${this.#key}` };
    let body: Uint8Array | string | undefined = opts.body;
    if (opts.json !== undefined) {
      body = JSON.stringify(opts.json);
      headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      headers["Content-Type"] = opts.contentType ?? "application/octet-stream";
    }
    const url = `${this.endpoint}${path}${queryString(opts.query)}`;
    let resp: Response;
    try {
      resp = await fetch(url, { method, headers, body: body as BodyInit | undefined, signal: opts.signal });
    } catch (e) {
      const why = e instanceof Error ? (e.cause instanceof Error ? e.cause.message : e.message) : String(e);
      throw new KilnError(0, "Unreachable", `cannot reach kilnd at ${this.endpoint}: ${why} (is it running?)`);
    }
    if (!resp.ok) throw await KilnError.from(resp);
    return resp;
  }

  /** A request answered with JSON (or nothing, for a 204). */
  async call<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const resp = await this.request(method, path, opts);
    const text = await resp.text();
    return (text ? JSON.parse(text) : undefined) as T;
  }
}

/** A path segment, escaped. */
export const seg = (s: string | number): string => encodeURIComponent(String(s));
