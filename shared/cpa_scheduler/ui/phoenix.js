// A minimal Phoenix-channels client for Supabase Realtime (protocol vsn 1.0.0, JSON frames):
// one socket, one private channel joined with the user's access token, heartbeats, the token
// renewed on the joined channel, and reconnection with backoff. Enough for broadcast from
// the database; no presence, no postgres_changes.

const HEARTBEAT_MS = 25_000;
const BACKOFF_MS = [500, 1000, 2000, 5000, 10_000];
const GIVE_UP_AFTER = 3; // failed connections without a single join: the caller falls back

export class RealtimeChannel {
  /**
   * @param {string} projectUrl  the Supabase project URL (https://<ref>.supabase.co)
   * @param {string} key         the project's publishable key (public)
   * @param {string} topic       e.g. "tenant:<id>:user:<id>" (without "realtime:")
   * @param {object} handlers    {token(): string, onJoin(), onDrop(reason), onBroadcast(event, payload), onRefused(reason)}
   */
  constructor(projectUrl, key, topic, handlers) {
    const u = new URL(projectUrl);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.pathname = u.pathname.replace(/\/+$/, "") + "/realtime/v1/websocket";
    u.search = new URLSearchParams({ apikey: key, vsn: "1.0.0" }).toString();
    this.url = u.toString();
    this.topic = `realtime:${topic}`;
    this.h = handlers;
    this.ref = 0;
    this.attempt = 0;
    this.joined = false;
    this.closed = false;
  }

  open() {
    this.closed = false;
    this.connect();
  }

  close() {
    this.closed = true;
    clearInterval(this.beat);
    clearTimeout(this.retry);
    if (this.ws) {
      if (this.joined) this.send({ topic: this.topic, event: "phx_leave", payload: {}, join_ref: this.joinRef });
      this.ws.close();
    }
  }

  /** A renewed access token: the joined channel keeps its authorization. */
  setToken(token) {
    if (this.joined) this.send({ topic: this.topic, event: "access_token", payload: { access_token: token }, join_ref: this.joinRef });
  }

  connect() {
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.dropped(String(e));
      return;
    }
    this.ws = ws;
    this.pendingBeat = null;
    ws.onopen = () => {
      this.join();
      clearInterval(this.beat);
      this.beat = setInterval(() => this.heartbeat(), HEARTBEAT_MS);
    };
    ws.onmessage = (m) => this.receive(JSON.parse(m.data));
    ws.onclose = () => { if (this.ws === ws) this.dropped("connection closed"); };
    ws.onerror = () => { /* onclose follows */ };
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ ref: String(++this.ref), ...frame }));
      return String(this.ref);
    }
    return null;
  }

  join() {
    this.joinRef = String(this.ref + 1);
    this.send({
      topic: this.topic, event: "phx_join", join_ref: this.joinRef,
      payload: {
        config: { broadcast: { ack: false, self: false }, presence: { key: "" }, postgres_changes: [], private: true },
        access_token: this.h.token(),
      },
    });
  }

  heartbeat() {
    if (this.pendingBeat) {
      // The last heartbeat got no answer: the connection is dead even if the socket is open.
      this.ws.close();
      this.dropped("heartbeat timeout");
      return;
    }
    this.pendingBeat = this.send({ topic: "phoenix", event: "heartbeat", payload: {} });
  }

  receive(msg) {
    if (msg.topic === "phoenix") {
      if (msg.ref === this.pendingBeat) this.pendingBeat = null;
      return;
    }
    if (msg.topic !== this.topic) return;
    if (msg.event === "phx_reply" && msg.ref === this.joinRef) {
      if (msg.payload.status === "ok") {
        this.joined = true;
        this.everJoined = true;
        this.attempt = 0;
        this.h.onJoin();
      } else {
        const reason = msg.payload.response?.reason || "join refused";
        this.joined = false;
        this.h.onRefused(reason);
      }
    } else if (msg.event === "broadcast") {
      this.h.onBroadcast(msg.payload.event, msg.payload.payload);
    } else if (msg.event === "phx_close" || msg.event === "phx_error") {
      this.joined = false;
      this.h.onDrop(msg.event);
      this.schedule(() => this.join());
    } else if (msg.event === "system" && msg.payload?.status === "error") {
      this.joined = false;
      this.h.onDrop(msg.payload.message || "system error");
    }
  }

  dropped(reason) {
    clearInterval(this.beat);
    const was = this.joined;
    this.joined = false;
    this.ws = null;
    if (this.closed) return;
    if (!this.everJoined && this.attempt >= GIVE_UP_AFTER) {
      // Never joined: Realtime is unreachable from here (a firewall, a wrong URL).
      this.closed = true;
      this.h.onRefused(`cannot connect (${reason})`);
      return;
    }
    if (was || this.attempt === 0) this.h.onDrop(reason);
    this.schedule(() => this.connect());
  }

  schedule(fn) {
    if (this.closed) return;
    clearTimeout(this.retry);
    const wait = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this.retry = setTimeout(() => {
      if (this.closed) return;
      if (fn === undefined) return;
      // A rejoin needs the socket; without one, connect (which joins when open).
      if (this.ws && this.ws.readyState === WebSocket.OPEN) fn();
      else if (!this.ws) this.connect();
    }, wait);
  }
}
