/**
 * kilnd's control API with the seed's calls (runMicrovm, createMicrovmAuthToken,
 * terminateMicrovm, the image calls, …), the files API and the processes API. Requests and
 * responses are the types generated from spec/openapi.yaml (`api.ts`).
 */
import type { components } from "./api.js";
import { type ClientOptions, Transport } from "./transport.js";
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
    codeArtifact: {
        artifactId: string;
    } | {
        bytes: Uint8Array;
        format?: "tar" | "zip";
    };
};
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
export declare class ProcessOutput implements AsyncIterable<OutputChunk> {
    #private;
    position: number;
    exit?: Process;
    constructor(resp: Response, from: number, abort: AbortController);
    close(): void;
    [Symbol.asyncIterator](): AsyncIterator<OutputChunk>;
    /** Every remaining byte until the exit, as text. */
    text(): Promise<string>;
}
export declare class Client {
    #private;
    readonly http: Transport;
    constructor(opts?: ClientOptions);
    get endpoint(): string;
    uploadArtifact(bytes: Uint8Array, format?: "tar" | "zip"): Promise<S["Artifact"]>;
    createMicrovmImage(req: CreateImageInput): Promise<S["CreateImageResponse"]>;
    getMicrovmImage(imageIdentifier: string): Promise<Image>;
    listMicrovmImages(query?: {
        status?: string;
        label?: string[];
        limit?: number;
        cursor?: string;
    }): Promise<S["ImageList"]>;
    deleteMicrovmImage(imageIdentifier: string): Promise<void>;
    /** The image once it is no longer CREATING; a KilnError when it FAILED or time ran out. */
    waitMicrovmImage(imageIdentifier: string, timeoutMs?: number): Promise<Image>;
    runMicrovm(req: RunMicrovmRequest): Promise<RunMicrovmResponse>;
    getMicrovm(microvmIdentifier: string): Promise<Microvm>;
    listMicrovms(query?: {
        state?: MicrovmState;
        image?: string;
        label?: string[];
        limit?: number;
        cursor?: string;
    }): Promise<S["MicrovmList"]>;
    /** The microVM once it is in `state` (or TERMINATED); a KilnError when time ran out first. */
    waitMicrovm(microvmIdentifier: string, state?: MicrovmState, timeoutMs?: number): Promise<Microvm>;
    /** Sets labels (a value) and removes them (`null`); the others are kept. */
    updateMicrovm(microvmIdentifier: string, labels: Record<string, string | null>): Promise<Microvm>;
    /** Sets and removes an image's labels, as updateMicrovm does. */
    updateMicrovmImage(imageIdentifier: string, labels: Record<string, string | null>): Promise<Image>;
    /** The microVM's metrics history, oldest first (the newest is also in getMicrovm's `metrics`). */
    getMicrovmMetrics(microvmIdentifier: string, sinceMs?: number): Promise<S["MicrovmMetricsHistory"]>;
    /** `count` copies of a RUNNING microVM (memory, processes, disk), on their way to RUNNING. */
    forkMicrovm(microvmIdentifier: string, count?: number): Promise<S["ForkMicrovmResponse"]>;
    suspendMicrovm(microvmIdentifier: string): Promise<Microvm>;
    resumeMicrovm(microvmIdentifier: string): Promise<Microvm>;
    terminateMicrovm(microvmIdentifier: string): Promise<Microvm>;
    /** A command's whole output at its end (8 MiB at most): see startProcess for streaming. */
    exec(microvmIdentifier: string, command: string[], timeoutSeconds?: number): Promise<ExecResponse>;
    createMicrovmAuthToken(req: CreateTokenRequest): Promise<CreateTokenResponse>;
    /** Revokes every token of a microVM (a Sandbox then gets a fresh one by itself). */
    revokeMicrovmAuthTokens(microvmIdentifier: string): Promise<void>;
    ingressInfo(): Promise<IngressInfo>;
    /** Registers `url` for lifecycle events; the answer's `secret` (shown once) checks deliveries (verifyWebhook). */
    createWebhook(req: S["CreateWebhookRequest"]): Promise<S["Webhook"]>;
    /** ListNodes: the kilnd nodes sharing the database (this one alone without a cluster). */
    listNodes(): Promise<S["NodeList"]>;
    /** DrainNode: the node suspends its microVMs and hands them to other nodes. */
    drainNode(name: string): Promise<S["Node"]>;
    /** UndrainNode: the node takes microVMs again. */
    undrainNode(name: string): Promise<S["Node"]>;
    /** RemoveNode: forgets a node that is gone for good and holds no microVM. */
    removeNode(name: string): Promise<void>;
    listWebhooks(): Promise<S["WebhookList"]>;
    deleteWebhook(webhookId: string): Promise<void>;
    /** The newest deliveries, newest first. */
    listWebhookDeliveries(webhookId: string): Promise<S["DeliveryList"]>;
    listFiles(id: string, path: string, opts?: {
        user?: string;
        limit?: number;
    }): Promise<FileList>;
    statFile(id: string, path: string, opts?: {
        user?: string;
    }): Promise<FileEntry>;
    readFile(id: string, path: string, opts?: {
        user?: string;
    }): Promise<Uint8Array>;
    /** Writes a file atomically (the old one stays whole until the new one is complete). */
    writeFile(id: string, path: string, data: Uint8Array | string, opts?: {
        user?: string;
        mode?: string;
        createParents?: boolean;
    }): Promise<FileEntry>;
    makeDirectory(id: string, path: string, opts?: {
        user?: string;
        mode?: string;
        parents?: boolean;
    }): Promise<FileEntry>;
    moveFile(id: string, from: string, to: string, opts?: {
        user?: string;
    }): Promise<FileEntry>;
    removeFile(id: string, path: string, opts?: {
        user?: string;
        recursive?: boolean;
    }): Promise<void>;
    /** A directory as a tar stream's bytes. */
    downloadArchive(id: string, path: string, opts?: {
        user?: string;
    }): Promise<Uint8Array>;
    /** Unpacks a tar stream under `path`. */
    uploadArchive(id: string, path: string, tar: Uint8Array, opts?: {
        user?: string;
    }): Promise<void>;
    /** Changes in a directory as they happen; `return()` (or `break`) ends the watch. */
    watchFiles(id: string, path: string, opts?: {
        user?: string;
    }): Promise<AsyncGenerator<FileEvent>>;
    /** Starts a process that runs on its own (`command` or `shell`); answers at once. */
    startProcess(id: string, req: StartProcessRequest): Promise<Process>;
    listProcesses(id: string, query?: {
        running?: boolean;
        tag?: string;
        limit?: number;
        cursor?: string;
    }): Promise<ProcessList>;
    getProcess(id: string, pid: number, opts?: {
        waitSeconds?: number;
    }): Promise<Process>;
    /** The process once it exited. */
    waitProcess(id: string, pid: number, timeoutMs?: number): Promise<Process>;
    /** The process's output from byte `from` on, as it comes. */
    processOutput(id: string, pid: number, opts?: {
        from?: number;
    }): Promise<ProcessOutput>;
    /** Writes to its stdin (at most 1 MiB; a string is UTF-8); `eof` then closes it. */
    writeProcessStdin(id: string, pid: number, data: Uint8Array | string, opts?: {
        eof?: boolean;
    }): Promise<void>;
    /** A signal (a name such as "TERM" or a number) for its process group. */
    signalProcess(id: string, pid: number, signal?: string | number): Promise<void>;
    resizeProcess(id: string, pid: number, size: TerminalSize): Promise<void>;
}
export {};
