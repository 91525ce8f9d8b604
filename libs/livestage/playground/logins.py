"""Who is looking at the playground: logins (cookie -> API key), CSRF tokens and Origin checks.

A visitor logs in once with an API key of the session API; the playground keeps the key on the
server and gives the browser only a random login id in an HttpOnly, SameSite=Strict cookie. Every
state-changing request must also carry the login's CSRF token, and a request whose `Origin` names
another site is refused, so a page elsewhere can neither use nor steal the login.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

from aiohttp import web
from yarl import URL

LOGIN_COOKIE = "ls_login"
CSRF_HEADER = "X-CSRF-Token"


class Refusal(Exception):
    """A request refused with a 4xx (or 5xx) JSON error naming the field at fault."""

    def __init__(self, status: int, message: str, field: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


@dataclass
class Login:
    key: str
    csrf: str
    expires: float


def same_host(origin: str, host: str) -> bool:
    """Whether an `Origin` header names this host (host and port; `null` and junk never do)."""
    try:
        o = URL(origin)
        if o.scheme not in ("http", "https") or not o.host or o.path not in ("", "/") or o.query_string:
            return False
        h = URL.build(scheme=o.scheme, authority=host)
        return bool(h.host) and o.host.lower() == h.host.lower() and o.port == h.port
    except (ValueError, TypeError):
        return False


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def check_origin(request: web.Request, required: bool = False) -> None:
    """Refuses a cross-site request (and, with `required`, one without an Origin)."""
    origin = request.headers.get("Origin")
    if origin is None:
        if required:
            raise Refusal(403, "an Origin header of this host is required", "Origin")
        return
    if not same_host(origin, request.host):
        raise Refusal(403, f"cross-site request refused (Origin {origin[:100]!r} is not this host)", "Origin")


class Logins:
    """Login id -> `Login`, oldest first; expired logins and those beyond `max_logins` are dropped."""

    def __init__(self, ttl_s: float, max_logins: int):
        self.ttl_s = ttl_s
        self.max_logins = max_logins
        self._by_id: OrderedDict[str, Login] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def values(self) -> Iterator[Login]:
        return iter(self._by_id.values())

    def new(self, key: str) -> tuple[str, Login]:
        now = time.monotonic()
        while self._by_id:  # oldest first: expired ones are at the front
            first = next(iter(self._by_id.values()))
            if first.expires > now and len(self._by_id) < self.max_logins:
                break
            self._by_id.popitem(last=False)
        login_id = secrets.token_urlsafe(32)
        login = Login(key, secrets.token_urlsafe(32), now + self.ttl_s)
        self._by_id[login_id] = login
        return login_id, login

    def drop(self, login_id: str) -> None:
        self._by_id.pop(login_id, None)

    def current(self, request: web.Request) -> tuple[str, Login] | None:
        login_id = request.cookies.get(LOGIN_COOKIE, "")
        login = self._by_id.get(login_id) if login_id else None
        if login is None:
            return None
        if login.expires <= time.monotonic():
            self.drop(login_id)
            return None
        return login_id, login

    def require(self, request: web.Request) -> tuple[str, Login]:
        current = self.current(request)
        if current is None:
            raise Refusal(401, "not logged in (or the login expired): log in with an API key at /", LOGIN_COOKIE)
        return current

    def state_changing(self, request: web.Request) -> tuple[str, Login]:
        """The checks of every POST after login: same-site Origin, a login, its CSRF token."""
        check_origin(request)
        login_id, login = self.require(request)
        given = request.headers.get(CSRF_HEADER, "")
        if not given or not same_secret(given, login.csrf):
            raise Refusal(403, f"missing or wrong {CSRF_HEADER} header (reload the page)", CSRF_HEADER)
        return login_id, login

    def set_cookie(self, response: web.StreamResponse, request: web.Request, login_id: str) -> None:
        response.set_cookie(LOGIN_COOKIE, login_id, httponly=True, samesite="Strict", path="/",
                            secure=request.secure, max_age=max(1, math.ceil(self.ttl_s)))
