export interface VerifyOptions {
    /** Seconds a delivery's timestamp may be away from now (default 300): older is a replay. */
    toleranceSeconds?: number;
    /** Now, in Unix seconds (default: the clock). */
    nowSeconds?: number;
}
/**
 * Checks `signature` (`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`) and returns
 * the parsed payload; throws for a malformed header, a wrong signature, or a replay.
 */
export declare function verifyWebhook(secret: string, body: Uint8Array | string, signature: string, opts?: VerifyOptions): unknown;
