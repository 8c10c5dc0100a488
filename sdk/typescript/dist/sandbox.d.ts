/**
 * A microVM for as long as you use it, with requests to its app that create and refresh
 * their tokens themselves, and its files and processes one call away.
 */
import { Client, type FileEntry, type Process, type ProcessOutput, type RunMicrovmRequest, type StartProcessRequest } from "./client.js";
export interface SandboxOptions extends Partial<Omit<RunMicrovmRequest, "imageIdentifier">> {
    client?: Client;
    /** The app port requests go to by default (8080). */
    port?: number;
    /** Lifetime of the tokens it creates (default 5 minutes). */
    tokenMinutes?: number;
    /** How long to wait for RUNNING (default 180 s). */
    startTimeoutMs?: number;
}
export declare class Sandbox {
    #private;
    readonly client: Client;
    readonly microvmId: string;
    /** Where its app is reached, as RunMicrovm returned it. */
    readonly endpoint: string;
    readonly port: number;
    private constructor();
    /** Runs a microVM of `image` and waits until it is RUNNING (terminating it if that fails). */
    static create(image: string, opts?: SandboxOptions): Promise<Sandbox>;
    /** Terminates it (memory, disk, processes); safe to call twice. */
    terminate(): Promise<void>;
    /** A token for `port`, reused until shortly before it expires. */
    token(port?: number, fresh?: boolean): Promise<string>;
    /**
     * A request to the app (`path` on `port`, default the sandbox's), through the ingress with
     * a token; a 401 (expired or revoked) is retried once with a new one.
     */
    fetch(path: string, init?: RequestInit & {
        port?: number;
    }): Promise<Response>;
    readFile(path: string, opts?: {
        user?: string;
    }): Promise<Uint8Array>;
    writeFile(path: string, data: Uint8Array | string, opts?: {
        user?: string;
        mode?: string;
        createParents?: boolean;
    }): Promise<FileEntry>;
    listFiles(path: string, opts?: {
        user?: string;
        limit?: number;
    }): Promise<{
        path: string;
        entries: import("./api.js").components["schemas"]["FileEntry"][];
        truncated: boolean;
    }>;
    startProcess(req: StartProcessRequest): Promise<Process>;
    processOutput(pid: number, opts?: {
        from?: number;
    }): Promise<ProcessOutput>;
    writeProcessStdin(pid: number, data: Uint8Array | string, opts?: {
        eof?: boolean;
    }): Promise<void>;
    signalProcess(pid: number, signal?: string | number): Promise<void>;
    waitProcess(pid: number, timeoutMs?: number): Promise<Process>;
}
