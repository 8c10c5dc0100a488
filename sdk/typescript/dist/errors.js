/** An error kilnd answered with: its HTTP status, its stable code, and what to do. */
export class KilnError extends Error {
    status;
    code;
    constructor(status, code, message) {
        super(`${code} (${status}): ${message}`);
        this.name = "KilnError";
        this.status = status;
        this.code = code;
    }
    /** The error of a response that was not ok, read from its ErrorBody. */
    static async from(resp) {
        const text = await resp.text();
        try {
            const body = JSON.parse(text);
            if (typeof body.code === "string") {
                return new KilnError(resp.status, body.code, body.message ?? "");
            }
        }
        catch {
            // Not an ErrorBody: a proxy's or an older kilnd's answer.
        }
        return new KilnError(resp.status, "Error", text.slice(0, 500));
    }
}
