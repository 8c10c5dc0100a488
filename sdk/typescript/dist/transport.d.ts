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
/** `?a=1&label=x&label=y` of the parameters given (arrays repeat their key). */
export declare function queryString(query: RequestOptions["query"]): string;
export declare class Transport {
    #private;
    readonly endpoint: string;
    constructor(opts?: ClientOptions);
    /** One request; a status that is not 2xx is thrown as a {@link KilnError}. */
    request(method: string, path: string, opts?: RequestOptions): Promise<Response>;
    /** A request answered with JSON (or nothing, for a 204). */
    call<T>(method: string, path: string, opts?: RequestOptions): Promise<T>;
}
/** A path segment, escaped. */
export declare const seg: (s: string | number) => string;
