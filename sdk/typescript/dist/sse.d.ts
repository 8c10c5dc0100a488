/** Server-sent events read from a fetch response body, as they come. */
export interface SseEvent {
    event: string;
    id?: string;
    data: string;
}
/** The events of `body` until it ends. Comments (keep-alives) are skipped. */
export declare function events(body: ReadableStream<Uint8Array>): AsyncGenerator<SseEvent>;
