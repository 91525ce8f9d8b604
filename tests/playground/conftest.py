"""One real stack (nats, redis, every service, the playground process) for the playground tests,
with a second tenant `other`."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from livestage.devstack.stack import LocalStack

from playground.helpers import OTHER_TENANT, HostileContext, base_url, start_session


@pytest.fixture(scope="session")
def pg_stack(tmp_path_factory):
    s = LocalStack(tmp_path_factory.mktemp("pg"), preset="tiny", playground=True,
                   extra_tenants=[dict(OTHER_TENANT)], env={"LIVESTAGE_CAPACITY": "8"})
    s.start(timeout=180)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def hostile_context(pg_stack) -> HostileContext:
    async def make() -> HostileContext:
        canary = await start_session(pg_stack)
        foreign = await start_session(pg_stack, pg_stack.credentials.tenant_keys["other"], start=False)
        base = base_url(pg_stack)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            cookies, tokens = [], []
            for _ in range(2):
                async with http.post(f"{base}/login", json={"key": pg_stack.api_key}) as r:
                    assert r.status == 200
                    tokens.append((await r.json())["csrf_token"])
                    cookies.append(r.cookies["ls_login"].value)
        return HostileContext(base, cookies[0], tokens[0], tokens[1], canary, foreign)

    return asyncio.run(make())
