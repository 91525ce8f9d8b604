"""Hostile requests to the playground, as a table: each names what it sends and the JSON error
(status and `field`) the playground must answer with. `test_hostile.py` runs them against a real
stack and checks that the server, and a session running elsewhere, live on.

Placeholders filled in at run time (`HostileContext`): `{login}` a live login's cookie value,
`{csrf}` its CSRF token, `{other_csrf}` the token of another login, `{origin}` the playground's own
origin, `{canary}` a running session of the dev tenant, `{foreign}` a session of tenant `other`.
Method `WS` is a GET with WebSocket upgrade headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HostileCase:
    name: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | str | None = None
    status: int = 400
    field: str = ""


JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LOGGED_IN = {"Cookie": "ls_login={login}"}
WITH_CSRF = {**LOGGED_IN, "X-CSRF-Token": "{csrf}"}
EVIL = {"Origin": "http://evil.example"}
SAME_ORIGIN = {"Origin": "{origin}"}
HUGE = b"x" * (1 << 20)
WRONG_KEY = '{"key": "lsk_' + "A" * 43 + '"}'

PLAYGROUND_HOSTILE_CASES: list[HostileCase] = [
    # -- POST /login ---------------------------------------------------------------------------
    HostileCase("login_body_not_json", "POST", "/login", JSON, "{not json", 400, "body"),
    HostileCase("login_body_json_array", "POST", "/login", JSON, "[1, 2]", 400, "body"),
    HostileCase("login_body_deeply_nested", "POST", "/login", JSON, "[" * 50000, 400, "body"),
    HostileCase("login_body_not_utf8", "POST", "/login", JSON, b"\xff\xfe\x00{", 400, "body"),
    HostileCase("login_missing_key", "POST", "/login", JSON, "{}", 400, "key"),
    HostileCase("login_key_not_a_string", "POST", "/login", JSON, '{"key": 123}', 400, "key"),
    HostileCase("login_key_blank", "POST", "/login", JSON, '{"key": "   "}', 400, "key"),
    HostileCase("login_wrong_key", "POST", "/login", JSON, WRONG_KEY, 401, "key"),
    HostileCase("login_key_header_injection", "POST", "/login", JSON,
                '{"key": "lsk_abc\\r\\nx-evil: 1"}', 401, "key"),
    HostileCase("login_key_non_ascii", "POST", "/login", JSON, '{"key": "lsk_\\u00e9\\u4e2d"}', 401, "key"),
    HostileCase("login_key_too_long", "POST", "/login", JSON, '{"key": "lsk_' + "a" * 5000 + '"}', 401, "key"),
    HostileCase("login_huge_body", "POST", "/login", JSON, HUGE, 413, "body"),
    HostileCase("login_form_missing_key", "POST", "/login", FORM, "foo=bar", 400, "key"),
    HostileCase("login_form_not_utf8", "POST", "/login", FORM, b"key=\xff\xfe", 400, "body"),
    HostileCase("login_cross_site_origin", "POST", "/login", {**JSON, **EVIL}, WRONG_KEY, 403, "Origin"),
    HostileCase("login_null_origin", "POST", "/login", {**JSON, "Origin": "null"}, WRONG_KEY, 403, "Origin"),
    # -- GET /login?ticket= ----------------------------------------------------------------------
    HostileCase("ticket_wrong", "GET", "/login?ticket=nope", status=403, field="ticket"),
    HostileCase("ticket_empty", "GET", "/login?ticket=", status=403, field="ticket"),
    HostileCase("ticket_huge", "GET", "/login?ticket=" + "a" * 4000, status=403, field="ticket"),
    # -- POST /api/sessions, POST /logout --------------------------------------------------------
    HostileCase("create_without_login", "POST", "/api/sessions", {"X-CSRF-Token": "{csrf}"}, None, 401, "ls_login"),
    HostileCase("create_forged_cookie", "POST", "/api/sessions",
                {"Cookie": "ls_login=forged", "X-CSRF-Token": "{csrf}"}, None, 401, "ls_login"),
    HostileCase("create_without_csrf", "POST", "/api/sessions", LOGGED_IN, None, 403, "X-CSRF-Token"),
    HostileCase("create_wrong_csrf", "POST", "/api/sessions", {**LOGGED_IN, "X-CSRF-Token": "wrong"},
                None, 403, "X-CSRF-Token"),
    HostileCase("create_csrf_of_another_login", "POST", "/api/sessions",
                {**LOGGED_IN, "X-CSRF-Token": "{other_csrf}"}, None, 403, "X-CSRF-Token"),
    HostileCase("create_csrf_latin1", "POST", "/api/sessions", {**LOGGED_IN, "X-CSRF-Token": "\xe9" * 43},
                None, 403, "X-CSRF-Token"),
    HostileCase("create_cross_site_origin", "POST", "/api/sessions", {**WITH_CSRF, **EVIL}, None, 403, "Origin"),
    HostileCase("create_origin_other_port", "POST", "/api/sessions",
                {**WITH_CSRF, "Origin": "http://127.0.0.1:1"}, None, 403, "Origin"),
    HostileCase("create_huge_body", "POST", "/api/sessions", {**WITH_CSRF, **JSON}, HUGE, 413, "body"),
    HostileCase("create_body_not_json", "POST", "/api/sessions", {**WITH_CSRF, **JSON}, "nope", 400, "body"),
    HostileCase("create_body_json_string", "POST", "/api/sessions", {**WITH_CSRF, **JSON}, '"x"', 400, "body"),
    HostileCase("logout_without_csrf", "POST", "/logout", LOGGED_IN, None, 403, "X-CSRF-Token"),
    HostileCase("logout_without_login", "POST", "/logout", {"X-CSRF-Token": "{csrf}"}, None, 401, "ls_login"),
    HostileCase("logout_cross_site_origin", "POST", "/logout", {**WITH_CSRF, **EVIL}, None, 403, "Origin"),
    # -- GET /api/sessions/{id}/config and /stats ---------------------------------------------------
    HostileCase("config_without_login", "GET", "/api/sessions/{canary}/config", status=401, field="ls_login"),
    HostileCase("config_forged_cookie", "GET", "/api/sessions/{canary}/config", {"Cookie": "ls_login=x" * 200},
                status=401, field="ls_login"),
    HostileCase("config_bad_id_chars", "GET", "/api/sessions/bad%20id%3Cscript%3E/config", LOGGED_IN,
                status=400, field="session"),
    HostileCase("config_id_too_long", "GET", "/api/sessions/" + "a" * 65 + "/config", LOGGED_IN,
                status=400, field="session"),
    HostileCase("config_unknown_session", "GET", "/api/sessions/no-such-session/config", LOGGED_IN,
                status=404, field="session"),
    HostileCase("config_other_tenants_session", "GET", "/api/sessions/{foreign}/config", LOGGED_IN,
                status=404, field="session"),
    HostileCase("stats_without_login", "GET", "/api/sessions/{canary}/stats", status=401, field="ls_login"),
    HostileCase("stats_other_tenants_session", "GET", "/api/sessions/{foreign}/stats", LOGGED_IN,
                status=404, field="session"),
    HostileCase("stats_before_any_report", "GET", "/api/sessions/{canary}/stats", LOGGED_IN,
                status=404, field="session"),
    # -- WS /api/sessions/{id}/stream ---------------------------------------------------------------
    HostileCase("ws_without_origin", "WS", "/api/sessions/{canary}/stream", LOGGED_IN, status=403, field="Origin"),
    HostileCase("ws_cross_site_origin", "WS", "/api/sessions/{canary}/stream", {**LOGGED_IN, **EVIL},
                status=403, field="Origin"),
    HostileCase("ws_without_cookie", "WS", "/api/sessions/{canary}/stream", SAME_ORIGIN,
                status=401, field="ls_login"),
    HostileCase("ws_forged_cookie", "WS", "/api/sessions/{canary}/stream",
                {**SAME_ORIGIN, "Cookie": "ls_login=forged"}, status=401, field="ls_login"),
    HostileCase("ws_other_tenants_session", "WS", "/api/sessions/{foreign}/stream", {**LOGGED_IN, **SAME_ORIGIN},
                status=404, field="session"),
    HostileCase("ws_bad_session_id", "WS", "/api/sessions/%2e%2e%3B/stream", {**LOGGED_IN, **SAME_ORIGIN},
                status=400, field="session"),
    HostileCase("stream_without_upgrade", "GET", "/api/sessions/{canary}/stream", {**LOGGED_IN, **SAME_ORIGIN},
                status=400, field="Upgrade"),
    # -- anything else -------------------------------------------------------------------------------
    HostileCase("unknown_api_route", "GET", "/api/nope", LOGGED_IN, status=404, field="path"),
    HostileCase("method_not_allowed", "DELETE", "/api/sessions", WITH_CSRF, status=405, field="method"),
    HostileCase("post_to_the_page", "POST", "/", WITH_CSRF, "x", 405, "method"),
]
