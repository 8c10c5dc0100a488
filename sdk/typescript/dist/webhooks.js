/** Checking a webhook delivery: its `Kiln-Signature` against the raw body and the clock. */
import { createHmac, timingSafeEqual } from "node:crypto";
/**
 * Checks `signature` (`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`) and returns
 * the parsed payload; throws for a malformed header, a wrong signature, or a replay.
 */
export function verifyWebhook(secret, body, signature, opts = {}) {
    const fields = new Map(signature.split(",").map((part) => {
        const eq = part.indexOf("=");
        return [part.slice(0, eq), part.slice(eq + 1)];
    }));
    const t = Number(fields.get("t"));
    const v1 = fields.get("v1");
    if (!Number.isInteger(t) || !v1 || !/^[0-9a-f]{64}$/.test(v1)) {
        throw new Error(`not a Kiln-Signature: ${JSON.stringify(signature)}`);
    }
    const now = opts.nowSeconds ?? Date.now() / 1000;
    const tolerance = opts.toleranceSeconds ?? 300;
    if (Math.abs(now - t) > tolerance) {
        throw new Error(`the delivery is ${Math.round(Math.abs(now - t))} s away from now: refused as a replay`);
    }
    const raw = typeof body === "string" ? Buffer.from(body) : Buffer.from(body);
    const expected = createHmac("sha256", secret).update(`${t}.`).update(raw).digest();
    if (!timingSafeEqual(expected, Buffer.from(v1, "hex"))) {
        throw new Error("the signature does not match the body");
    }
    return JSON.parse(raw.toString("utf8"));
}
