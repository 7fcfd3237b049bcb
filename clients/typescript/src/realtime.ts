/** Supabase Realtime through supabase-js: the client, the WebSocket for Node < 22, channels. */
import type { RealtimeChannel, SupabaseClient } from "@supabase/supabase-js";
import { CpaError } from "./errors.js";
import type { Inbox } from "./util.js";

/** A WebSocket constructor (the `ws` package's default export on Node < 22). */
export type WebSocketConstructor = new (url: string | URL, protocols?: string | string[]) => unknown;

/** An item of a channel's inbox: a subscribe state change, or a broadcast's payload. */
export type ChannelItem =
  | { kind: "state"; status: string; error?: Error }
  | { kind: "message"; payload: Record<string, unknown> };

/** Realtime could not be joined or rejoined; the caller goes on over the API. */
export class RealtimeUnavailable extends Error {}

/**
 * The WebSocket for supabase-js: the one given, none where the runtime has one (browsers,
 * Electron, Node 22+), else the optional `ws` package, imported only then.
 */
export async function webSocketTransport(given?: WebSocketConstructor): Promise<WebSocketConstructor | undefined> {
  if (given) return given;
  if (typeof (globalThis as { WebSocket?: unknown }).WebSocket !== "undefined") return undefined;
  // A variable specifier: bundlers for browsers must not try to resolve this Node-only package.
  const name = "ws";
  try {
    const mod = (await import(/* @vite-ignore */ /* webpackIgnore: true */ name)) as {
      default?: WebSocketConstructor;
      WebSocket?: WebSocketConstructor;
    };
    const ctor = mod.default ?? mod.WebSocket;
    if (ctor) return ctor;
  } catch {
    // reported below
  }
  throw new CpaError(
    "This runtime has no WebSocket (Node.js below 22) and the 'ws' package is not installed; " +
      "run 'npm install ws' or pass `transport` (a WebSocket constructor) in the client's options.",
    { code: "config_invalid" },
  );
}

export interface SupabaseSetup {
  url: string;
  key: string;
  transport?: WebSocketConstructor;
  /** The access token for a client without a session (a fixed token or a provider). */
  accessToken?: () => Promise<string>;
  /** A Supabase Auth session: supabase-js refreshes it and passes each new token on. */
  session?: { access_token: string; refresh_token: string };
  reconnectAfterMs?: number;
  clientOptions?: Record<string, unknown>;
}

/** A supabase-js client for Realtime (and, with a session, for the token). */
export async function createSupabase(setup: SupabaseSetup): Promise<SupabaseClient> {
  const { createClient } = await import("@supabase/supabase-js");
  const transport = await webSocketTransport(setup.transport);
  const realtime: Record<string, unknown> = { ...setup.clientOptions };
  if (transport) realtime.transport = transport;
  if (setup.reconnectAfterMs !== undefined) {
    const ms = setup.reconnectAfterMs;
    realtime.reconnectAfterMs = (tries: number) => Math.min(ms * 2 ** Math.max(0, tries - 1), 10_000);
  }
  if (setup.session) {
    const sb = createClient(setup.url, setup.key, {
      auth: { persistSession: false, autoRefreshToken: true, detectSessionInUrl: false },
      realtime,
    });
    const { error } = await sb.auth.setSession(setup.session);
    if (error) {
      throw new CpaError(`Supabase Auth did not accept the session (${error.message}); sign in again.`, {
        code: "unauthenticated",
        status: 401,
        cause: error,
      });
    }
    return sb;
  }
  return createClient(setup.url, setup.key, { accessToken: setup.accessToken, realtime });
}

/**
 * Join a private broadcast topic; every state change and every payload of `event` goes to
 * `inbox`. The join carries the user's current access token (supabase-js keeps it current).
 */
export async function joinPrivate(
  sb: SupabaseClient,
  topic: string,
  event: string,
  inbox: Inbox<ChannelItem>,
): Promise<RealtimeChannel> {
  // Before the join: a private channel is authorized by the token the join carries.
  await sb.realtime.setAuth();
  const channel = sb.channel(topic, { config: { private: true, broadcast: { self: false, ack: false } } });
  channel.on("broadcast", { event }, (message: { payload?: unknown }) => {
    const payload = message.payload;
    if (payload && typeof payload === "object") {
      inbox.push({ kind: "message", payload: payload as Record<string, unknown> });
    }
  });
  channel.subscribe((status: string, error?: Error) => inbox.push({ kind: "state", status, error }));
  return channel;
}
