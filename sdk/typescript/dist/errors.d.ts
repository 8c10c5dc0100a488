/** An error kilnd answered with: its HTTP status, its stable code, and what to do. */
export declare class KilnError extends Error {
    readonly status: number;
    readonly code: string;
    constructor(status: number, code: string, message: string);
    /** The error of a response that was not ok, read from its ErrorBody. */
    static from(resp: Response): Promise<KilnError>;
}
