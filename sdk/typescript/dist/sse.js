/** The events of `body` until it ends. Comments (keep-alives) are skipped. */
export async function* events(body) {
    const decoder = new TextDecoder();
    let buffer = "";
    let current = { event: "message", data: [] };
    const reader = body.getReader();
    try {
        for (;;) {
            const { value, done } = await reader.read();
            if (done)
                return;
            buffer += decoder.decode(value, { stream: true });
            let nl;
            while ((nl = buffer.indexOf("\n")) >= 0) {
                const line = buffer.slice(0, nl).replace(/\r$/, "");
                buffer = buffer.slice(nl + 1);
                if (line === "") {
                    if (current.data.length > 0) {
                        yield { event: current.event, id: current.id, data: current.data.join("\n") };
                    }
                    current = { event: "message", data: [] };
                }
                else if (!line.startsWith(":")) {
                    const colon = line.indexOf(":");
                    const field = colon < 0 ? line : line.slice(0, colon);
                    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                    if (field === "event")
                        current.event = value;
                    else if (field === "id")
                        current.id = value;
                    else if (field === "data")
                        current.data.push(value);
                }
            }
        }
    }
    finally {
        await reader.cancel().catch(() => undefined);
    }
}
