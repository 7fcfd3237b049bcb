// Entry module: configuration, sign-in, "signed in as … in tenant …", and the route.
import * as api from "./api.js";
import { h, clear } from "./dom.js";

const main = document.getElementById("main");

async function boot() {
  api.takeFragment();
  // The configuration and the session in parallel: the page's first paint waits for both.
  const settle = (p) => p.then((value) => ({ value }), (error) => ({ error }));
  const session = api.token() ? settle(api.call("GET", "/ui/session")) : null;
  // A job's page fetches the job at once too (a 1,000-ToDo job is the largest answer).
  const jobId = location.pathname.match(/^\/ui\/jobs\/([^/]+)\/?$/)?.[1];
  const prefetched = api.token() && jobId ? settle(api.call("GET", `/v1/jobs/${jobId}`)) : null;
  try {
    const r = await fetch("/ui/config.json", { cache: "no-store" });
    if (r.ok) api.setConfig(await r.json());
  } catch { /* keep the local defaults */ }
  document.getElementById("signout").addEventListener("click", () => {
    api.signOut();
    location.assign("/ui/");
  });
  if (!api.token()) return showSignIn();
  const { value: me, error: e } = await session;
  if (e) {
    if (e.status === 401) {
      api.signOut();
      return showSignIn(`Your token was refused: ${e.problem.detail || e.message}`);
    }
    return fail(e);
  }
  const who = document.getElementById("who");
  const name = me.email || api.claims().email || me.user_id;
  const tenant = me.tenant_name ? `${me.tenant_name} (${me.tenant_id})` : me.tenant_id;
  who.textContent = `Signed in as ${name} in tenant ${tenant}`;
  document.getElementById("signout").hidden = false;
  await route(me, prefetched);
}

async function route(me, prefetched) {
  const path = location.pathname.replace(/\/+$/, "");
  const job = path.match(/^\/ui\/jobs\/([^/]+)$/);
  const section = job ? "jobs" : path === "/ui/schedules" ? "schedules" : path === "/ui/agents" ? "agents" : "jobs";
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === section) a.setAttribute("aria-current", "page");
  }
  clear(main);
  if (job) return (await import("./job.js")).show(main, decodeURIComponent(job[1]), me, prefetched);
  if (section === "schedules") return (await import("./schedules.js")).show(main);
  if (section === "agents") return (await import("./agents.js")).show(main);
  return (await import("./jobs.js")).show(main);
}

function showSignIn(message) {
  clear(main);
  const cfg = api.getConfig();
  const out = h("p", { class: "answer err", role: "alert" }, message || "");
  const forms = [];
  if (cfg.supabase_url && cfg.supabase_publishable_key) {
    const email = h("input", { id: "email", type: "email", autocomplete: "username", required: true });
    const pw = h("input", { id: "password", type: "password", autocomplete: "current-password", required: true });
    forms.push(h("form", {
      class: "form panel", "aria-labelledby": "pw-title",
      onsubmit: async (ev) => {
        ev.preventDefault();
        try {
          await api.passwordSignIn(email.value, pw.value);
          location.reload();
        } catch (e) {
          out.textContent = e.message;
        }
      },
    },
    h("h2", { id: "pw-title" }, "Sign in with your account"),
    h("label", { for: "email" }, "Email", email),
    h("label", { for: "password" }, "Password", pw),
    h("div", {}, h("button", { class: "primary", type: "submit" }, "Sign in"))));
  }
  if (cfg.local || !forms.length) {
    const tok = h("textarea", { id: "token", required: true, spellcheck: "false", autocomplete: "off" });
    forms.push(h("form", {
      class: "form panel", "aria-labelledby": "tok-title",
      onsubmit: (ev) => {
        ev.preventDefault();
        api.signIn(tok.value.trim());
        location.reload();
      },
    },
    h("h2", { id: "tok-title" }, "Sign in with an access token"),
    h("p", { class: "muted" }, "Local mode: run ",
      h("code", {}, "cpa-scheduler ui"), " for a link that signs you in, or paste the output of ",
      h("code", {}, "cpa-scheduler token --tenant demo --user me"), "."),
    h("label", { for: "token" }, "Access token", tok),
    h("div", {}, h("button", { class: "primary", type: "submit" }, "Sign in"))));
  }
  main.append(h("h1", {}, "Sign in"), out, ...forms);
}

function fail(e) {
  clear(main);
  main.append(h("p", { class: "answer err", role: "alert" }, e.message || String(e)));
}

boot().catch(fail);
