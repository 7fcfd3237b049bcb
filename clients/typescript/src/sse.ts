/** A minimal Server-Sent Events reader over a fetch body (EventSource cannot send a token). */

export interface SseField {
  /** `retry` carries the server's reconnect delay in ms; `data` one event's joined data. */
  kind: "retry" | "data";
  value: string;
  id?: string;
  event?: string;
}

/** The `retry:` fields and the events of an SSE body, in order. */
export async function* readSse(body: ReadableStream<Uint8Array>): AsyncGenerator<SseField> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data: string[] = [];
  let id: string | undefined;
  let event: string | undefined;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return; // an event without its blank line is incomplete: dropped, as the spec says
      buffer += decoder.decode(value, { stream: true });
      let nl: number;
      // A CR at the very end may be the first half of a CRLF split across chunks: wait for more.
      while ((nl = buffer.search(/\r\n|\r(?!$)|\n/)) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") {
          if (data.length) yield { kind: "data", value: data.join("\n"), id, event };
          data = [];
          event = undefined;
          continue;
        }
        if (line.startsWith(":")) continue; // a comment (heartbeat)
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") data.push(val);
        else if (field === "id") id = val;
        else if (field === "event") event = val;
        else if (field === "retry" && /^\d+$/.test(val)) yield { kind: "retry", value: val };
      }
    }
  } finally {
    reader.releaseLock();
    await body.cancel().catch(() => undefined);
  }
}
