"""Every hostile request of `hostile_cases.py` against the real playground: the JSON error it must
answer with, and afterwards the server still answers and a session running elsewhere still runs."""

from __future__ import annotations

import base64
import os

import aiohttp
import pytest
from yarl import URL

from livestage.protos import session_pb2 as pb

from playground.helpers import HostileContext, session_state
from playground.hostile_cases import PLAYGROUND_HOSTILE_CASES, HostileCase


def _fill(text: str, ctx: HostileContext) -> str:
    values = {"login": ctx.login, "csrf": ctx.csrf, "other_csrf": ctx.other_csrf, "origin": ctx.base,
              "canary": ctx.canary, "foreign": ctx.foreign}
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def test_the_table_is_big_and_names_are_unique():
    names = [c.name for c in PLAYGROUND_HOSTILE_CASES]
    assert len(names) >= 25 and len(set(names)) == len(names)
    assert all(400 <= c.status < 500 and c.field for c in PLAYGROUND_HOSTILE_CASES)
    assert all(c.method in ("GET", "POST", "DELETE", "WS") and c.path.startswith("/") for c in PLAYGROUND_HOSTILE_CASES)


@pytest.mark.parametrize("case", PLAYGROUND_HOSTILE_CASES, ids=[c.name for c in PLAYGROUND_HOSTILE_CASES])
async def test_hostile_request_is_refused_and_harms_nothing(pg_stack, hostile_context: HostileContext,
                                                            case: HostileCase):
    ctx = hostile_context
    headers = {k: _fill(v, ctx) for k, v in case.headers.items()}
    method = case.method
    if method == "WS":
        method = "GET"
        headers.update({"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()})
    body = case.body.encode() if isinstance(case.body, str) else case.body
    url = URL(ctx.base + _fill(case.path, ctx), encoded=True)
    # no cookie jar: the case's headers are all the client sends
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("Content-Type",)) as http:
        async with http.request(method, url, headers=headers, data=body, allow_redirects=False) as r:
            assert r.content_type == "application/json", (r.status, await r.text())
            answer = await r.json()
            assert (r.status, answer.get("field")) == (case.status, case.field), answer
            assert isinstance(answer.get("error"), str) and answer["error"]
        async with http.get(f"{ctx.base}/healthz") as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        # the shared login survived (no hostile case may end it) and still sees the canary
        async with http.get(f"{ctx.base}/api/sessions/{ctx.canary}/config",
                            headers={"Cookie": f"ls_login={ctx.login}"}) as r:
            assert r.status == 200 and (await r.json())["session_id"] == ctx.canary
    canary = await session_state(pg_stack, ctx.canary)
    assert canary.state not in (pb.SESSION_STATE_ENDED, pb.SESSION_STATE_UNSPECIFIED), canary

