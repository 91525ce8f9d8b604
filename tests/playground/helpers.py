"""Helpers of the playground tests: log in, open and end sessions through the session API."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from livestage.protos import session_pb2 as pb

from integration.helpers import character, stub

OTHER_TENANT = {"id": "other", "max_sessions": 2, "max_session_seconds": 3600}


def base_url(stack) -> str:
    return f"http://127.0.0.1:{stack.playground_port}"


def http_client() -> aiohttp.ClientSession:
    """A client that keeps the playground's cookie (aiohttp's jar refuses IP hosts unless unsafe)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(http: aiohttp.ClientSession, stack, key: str | None = None) -> str:
    """Logs `http` in with `key` (the dev key by default); returns the login's CSRF token."""
    async with http.post(f"{base_url(stack)}/login", json={"key": stack.api_key if key is None else key}) as r:
        body = await r.json()
        assert r.status == 200, body
    return body["csrf_token"]


async def start_session(stack, api_key: str | None = None, start: bool = True) -> str:
    """A session opened (and started) straight through the session API."""
    channel, client = stub(stack, api_key)
    try:
        s = await client.CreateSession(pb.CreateSessionRequest(character=character(),
                                                               options=pb.SessionOptions(realtime=True)))
        if start:
            await client.StartSession(pb.SessionRef(session_id=s.session_id))
        return s.session_id
    finally:
        await channel.close()


async def end_session(stack, session_id: str, api_key: str | None = None) -> None:
    channel, client = stub(stack, api_key)
    try:
        await client.EndSession(pb.SessionRef(session_id=session_id))
    finally:
        await channel.close()


async def session_state(stack, session_id: str, api_key: str | None = None) -> pb.Session:
    channel, client = stub(stack, api_key)
    try:
        return await client.GetSession(pb.SessionRef(session_id=session_id))
    finally:
        await channel.close()


@dataclass
class HostileContext:
    """What the hostile cases fill into their placeholders."""

    base: str
    login: str
    """The value of a live dev login's `ls_login` cookie."""
    csrf: str
    """That login's CSRF token."""
    other_csrf: str
    """The CSRF token of a different login (valid, but not for `login`)."""
    canary: str
    """A started dev session that must survive every case."""
    foreign: str
    """A session of the tenant `other`."""
