// The API client of the page: the token lives in sessionStorage and travels only in the
// Authorization header, never in a URL sent to the server.

const TOKEN = "cpa.access_token";
const REFRESH = "cpa.refresh_token";
let config = { supabase_url: null, supabase_publishable_key: null, local: true };
const tokenListeners = new Set();

export function setConfig(c) { config = c; }
export function getConfig() { return config; }
export function token() { return sessionStorage.getItem(TOKEN); }
export function onToken(fn) { tokenListeners.add(fn); }

export function signIn(accessToken, refreshToken) {
  sessionStorage.setItem(TOKEN, accessToken);
  if (refreshToken) sessionStorage.setItem(REFRESH, refreshToken);
  else sessionStorage.removeItem(REFRESH);
  tokenListeners.forEach((fn) => fn(accessToken));
}

export function signOut() {
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(REFRESH);
}

/** The token's claims (unverified: for display and expiry only; the server verifies). */
export function claims(t = token()) {
  try {
    const part = t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return {};
  }
}

/** Take `#access_token=…` (Supabase Auth's redirect, or `cpa-scheduler ui`) and drop the
 *  fragment from the address bar, so it is neither kept in history nor shared by copying. */
export function takeFragment() {
  if (!location.hash.includes("access_token=")) return false;
  const params = new URLSearchParams(location.hash.slice(1));
  const t = params.get("access_token");
  history.replaceState(null, "", location.pathname + location.search);
  if (!t) return false;
  signIn(t, params.get("refresh_token"));
  return true;
}

export class ApiError extends Error {
  constructor(status, body) {
    const problem = typeof body === "object" && body ? body : { detail: String(body || "") };
    super(`${status} ${problem.title || ""}: ${problem.detail || "no detail"}`.replace(" :", ":"));
    this.status = status;
    this.problem = problem;
  }
}

let refreshing = null;

/** Renew a Supabase session shortly before it expires (when it came with a refresh token). */
async function fresh() {
  const t = token();
  const refresh = sessionStorage.getItem(REFRESH);
  if (!t || !refresh || !config.supabase_url) return t;
  const exp = claims(t).exp || 0;
  if (exp * 1000 - Date.now() > 60_000) return t;
  refreshing ??= (async () => {
    try {
      const r = await fetch(`${config.supabase_url}/auth/v1/token?grant_type=refresh_token`, {
        method: "POST",
        headers: { apikey: config.supabase_publishable_key, "Content-Type": "application/json" },
        body: JSON.stringify({ refresh_token: refresh }),
      });
      if (r.ok) {
        const s = await r.json();
        signIn(s.access_token, s.refresh_token);
      }
    } finally {
      refreshing = null;
    }
  })();
  await refreshing;
  return token();
}

export async function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${await fresh()}`, ...extra };
}

/** One API call; resolves to the JSON body (null for 204), rejects with ApiError. */
export async function call(method, path, body) {
  const headers = await authHeaders({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 204) return null;
  const text = await r.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON: keep the text */ }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

/** Supabase Auth: email and password for a session (when the page is configured for it). */
export async function passwordSignIn(email, password) {
  const r = await fetch(`${config.supabase_url}/auth/v1/token?grant_type=password`, {
    method: "POST",
    headers: { apikey: config.supabase_publishable_key, "Content-Type": "application/json" },
    body: JSON.stringify({ email, password }),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    throw new Error(data.error_description || data.msg || data.message || `Sign-in refused (${r.status}).`);
  }
  signIn(data.access_token, data.refresh_token);
}
