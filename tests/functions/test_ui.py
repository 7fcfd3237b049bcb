"""The jobs page's HTTP side: the shell and its files under a strict CSP, the configuration the
page reads before sign-in, and who the page is signed in as. (The browser tests are in
test_ui_browser.py.)"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources

import httpx
import pytest
from cpa_scheduler import service, settings

from tests.conftest import MemberFactory
from tests.functions.conftest import bearer

PAGES = ["/ui/", "/ui/jobs/00000000-0000-0000-0000-000000000000", "/ui/schedules", "/ui/agents"]


def policy(header: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in header.split(";")) if d}


@pytest.mark.parametrize("path", PAGES)
async def test_every_page_is_the_shell_under_a_strict_csp(
    client: httpx.AsyncClient, path: str
) -> None:
    r = await client.get(path)  # no token: the page signs in by itself
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = policy(r.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'", "https://test-project.supabase.co",
                                  "wss://test-project.supabase.co"]  # fmt: skip
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    # Nothing inline and nothing from elsewhere: every script and style is a file of /ui.
    assert "<style" not in r.text and " style=" not in r.text
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", r.text, re.S)
    assert scripts and all(
        'src="/ui/assets/' in attrs and not body.strip() for attrs, body in scripts
    )
    for ref in re.findall(r'(?:src|href)="([^"]+)"', r.text):
        assert ref.startswith("/ui/") or ref == "#main", ref


async def test_without_supabase_the_page_connects_only_to_its_origin(
    app: object, wire: Callable[..., service.Services]
) -> None:
    wire(supabase_url=None)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.get("/ui/")
        assert policy(r.headers["content-security-policy"])["connect-src"] == ["'self'"]
        assert (await c.get("/ui/config.json")).json() == {
            "supabase_url": None, "supabase_publishable_key": None, "local": False,
        }  # fmt: skip


async def test_the_files_are_served_with_their_types_and_nothing_else(
    client: httpx.AsyncClient,
) -> None:
    folder = resources.files("cpa_scheduler").joinpath("ui")
    names = sorted(p.name for p in folder.iterdir() if p.name != "index.html")
    assert {"app.js", "app.css", "graph.js", "live.js", "phoenix.js"} <= set(names)
    for name in names:
        r = await client.get(f"/ui/assets/{name}")
        assert r.status_code == 200, name
        assert "content-security-policy" in r.headers
    assert (
        (await client.get("/ui/assets/app.js"))
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert (await client.get("/ui/assets/app.css")).headers["content-type"].startswith("text/css")
    for bad in ["nope.js", "..%2Fapi%2Fui.py", ".hidden.js", "ui.py", "%2e%2e/__init__.py"]:
        r = await client.get(f"/ui/assets/{bad}")
        assert r.status_code == 404, bad
        assert r.headers["content-type"] == "application/problem+json"
    # No file of the page names another origin to load from (no CDN).
    for name in names:
        text = folder.joinpath(name).read_text()
        assert not re.search(r"(?:src|href|import)\s*[=(]?\s*[\"']https?://", text), name


async def test_ui_redirects_to_the_slash(client: httpx.AsyncClient) -> None:
    r = await client.get("/ui")
    assert r.status_code == 308 and r.headers["location"] == "/ui/"


async def test_config_names_the_realtime_project_only_with_its_key(
    client: httpx.AsyncClient, wire: Callable[..., service.Services]
) -> None:
    body = (await client.get("/ui/config.json")).json()
    assert body["supabase_url"] is None  # a URL alone (no publishable key): no Realtime
    wire(supabase_publishable_key="sb_publishable_abc")
    body = (await client.get("/ui/config.json")).json()
    assert body == {"supabase_url": "https://test-project.supabase.co",
                    "supabase_publishable_key": "sb_publishable_abc", "local": False}  # fmt: skip


async def test_session_says_who_and_which_tenant(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    a = await member_factory("Acme")
    r = await client.get("/ui/session", headers=bearer(a, email="ann@acme.test"))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "user_id": str(a.user_id), "email": "ann@acme.test", "tenant_id": str(a.tenant_id),
        "tenant_name": "Acme", "role": "owner",
        "tenants": [{"id": str(a.tenant_id), "name": "Acme", "role": "owner"}],
    }  # fmt: skip
    r = await client.get("/ui/session")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"


def test_the_publishable_key_is_read_under_both_names() -> None:
    assert settings.from_env({"SUPABASE_PUBLISHABLE_KEY": "k1"}).supabase_publishable_key == "k1"
    assert settings.from_env({"SUPABASE_ANON_KEY": "k2"}).supabase_publishable_key == "k2"
    both = {"SUPABASE_PUBLISHABLE_KEY": "k1", "SUPABASE_ANON_KEY": "k2"}
    assert settings.from_env(both).supabase_publishable_key == "k1"
