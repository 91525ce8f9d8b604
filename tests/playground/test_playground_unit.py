"""The playground app in process, against a fake session API and a fake bus: the bounds (logins,
page reports, the microphone queue) and the login rules, without starting a stack."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from livestage.config import SettingsError, load_settings
from livestage.playground.app import PLAYGROUND, Playground, PlaygroundSettings, create_app
from livestage.protos import session_pb2 as pb

KEYS = {"lsk_" + "a" * 40: "dev", "lsk_" + "b" * 40: "other"}
DEV_KEY, OTHER_KEY = list(KEYS)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeSessionApi:
    """What the playground calls, with tenants: a session is visible to its tenant's keys only."""

    def __init__(self):
        self.sessions: dict[str, str] = {"dev-1": "dev", "other-1": "other"}
        self.keys_seen: list[str] = []
        self.pushed: list[bytes] = []
        self.release = asyncio.Event()

    def _tenant(self, metadata) -> str:
        key = dict(metadata or ()).get("authorization", "").removeprefix("Bearer ")
        self.keys_seen.append(key)
        if key not in KEYS:
            raise _rpc_error(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        return KEYS[key]

    async def ListSessions(self, request, metadata=None, timeout=None):
        self._tenant(metadata)
        return pb.ListSessionsResponse()

    async def GetSession(self, request, metadata=None, timeout=None):
        tenant = self._tenant(metadata)
        if self.sessions.get(request.session_id) != tenant:
            raise _rpc_error(grpc.StatusCode.NOT_FOUND, f"session_id: {request.session_id}")
        return pb.Session(session_id=request.session_id, preset="tiny", state=pb.SESSION_STATE_IDLE)

    async def PushUserAudio(self, request_iterator, metadata=None, timeout=None):
        self._tenant(metadata)
        async for chunk in request_iterator:
            self.pushed.append(chunk.pcm16)
            await self.release.wait()  # a session API that stalls: the playground must not pile up audio
        return pb.PushAudioSummary()


class FakeBus:
    async def subscribe(self, subject, handler):
        class Sub:
            async def unsubscribe(self):
                return None
        return Sub()

    async def close(self):
        return None


def _app(**overrides) -> tuple[Playground, FakeSessionApi, object]:
    settings = load_settings(PlaygroundSettings, **overrides)
    app = create_app(settings)
    pg: Playground = app[PLAYGROUND]
    api = FakeSessionApi()

    async def fake_start(app):
        pg.bus, pg.client = FakeBus(), api  # type: ignore[assignment]

    app.on_startup.clear()
    app.on_cleanup.clear()
    app.on_startup.append(fake_start)
    return pg, api, app


async def _client(app) -> TestClient:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def _login(client: TestClient, key: str = DEV_KEY) -> str:
    r = await client.post("/login", json={"key": key})
    assert r.status == 200, await r.text()
    return (await r.json())["csrf_token"]


async def test_logins_are_capped_and_the_oldest_goes_first():
    pg, api, app = _app(playground_max_logins=3)
    client = await _client(app)
    try:
        for _ in range(5):
            await _login(client)
        assert len(pg.logins) == 3
        # the client holds the newest cookie: still logged in
        assert (await client.get("/api/sessions/dev-1/config")).status == 200
    finally:
        await client.close()


async def test_an_expired_login_is_refused():
    pg, api, app = _app(playground_login_ttl_s=0.2)
    client = await _client(app)
    try:
        await _login(client)
        assert (await client.get("/api/sessions/dev-1/config")).status == 200
        await asyncio.sleep(0.3)
        r = await client.get("/api/sessions/dev-1/config")
        assert r.status == 401 and (await r.json())["field"] == "ls_login"
        assert not pg.logins
    finally:
        await client.close()


async def test_every_call_carries_the_visitors_key_and_sees_only_their_tenant():
    pg, api, app = _app()
    client = await _client(app)
    try:
        await _login(client, OTHER_KEY)
        api.keys_seen.clear()
        assert (await client.get("/api/sessions/other-1/config")).status == 200
        r = await client.get("/api/sessions/dev-1/config")
        assert r.status == 404 and (await r.json())["field"] == "session"
        assert api.keys_seen == [OTHER_KEY, OTHER_KEY]
    finally:
        await client.close()


async def test_page_reports_are_bounded_and_cleaned():
    pg, api, app = _app(playground_max_stats=3)
    for i in range(5):
        pg._keep_stats(f"s{i}", {"type": "stats", "frames_drawn": i, "errors": ["e" * 1000] * 50,
                                 "x" * 100: 1, "nan": float("nan"), "nested": {"a": 1}})
    assert list(pg.stats) == ["s2", "s3", "s4"]
    kept = pg.stats["s4"]
    assert kept["frames_drawn"] == 4 and len(kept["errors"]) == 20 and len(kept["errors"][0]) == 200
    assert "x" * 100 not in kept and kept["nan"] is None and "nested" not in kept


async def test_the_microphone_queue_drops_the_oldest_audio_when_the_session_api_stalls():
    pg, api, app = _app(playground_mic_queue=4)
    client = await _client(app)
    try:
        await _login(client)
        origin = str(client.make_url("")).rstrip("/")
        ws = await client.ws_connect("/api/sessions/dev-1/stream", origin=origin)
        for i in range(40):
            await ws.send_bytes(i.to_bytes(2, "little"))
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.TEXT and "dropped" in msg.json()["error"] and msg.json()["field"] == "pcm16"
        await asyncio.sleep(0.2)
        api.release.set()
        await asyncio.sleep(0.2)
        await ws.close()
        # one chunk was in flight when the API stalled, at most 4 waited; the newest survived
        assert 1 < len(api.pushed) <= 1 + 4, len(api.pushed)
        assert api.pushed[-1] == (39).to_bytes(2, "little")
    finally:
        await client.close()


async def test_the_ticket_logs_in_once(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(DEV_KEY + "\n")
    pg, api, app = _app(playground_ticket_sha256=hashlib.sha256(b"t1ck3t").hexdigest(),
                        playground_ticket_key_file=str(key_file))
    client = await _client(app)
    try:
        r = await client.get("/login?ticket=wrong", allow_redirects=False)
        assert r.status == 403 and (await r.json())["field"] == "ticket"
        r = await client.get("/login?ticket=t1ck3t&session=dev-1", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/?session=dev-1"
        assert len(pg.logins) == 1
        r = await client.get("/login?ticket=t1ck3t", allow_redirects=False)
        assert r.status == 403 and (await r.json())["field"] == "ticket"
        assert len(pg.logins) == 1
    finally:
        await client.close()


async def test_a_ticket_whose_key_is_refused_is_not_spent(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("lsk_" + "z" * 40)
    pg, api, app = _app(playground_ticket_sha256=hashlib.sha256(b"t").hexdigest(),
                        playground_ticket_key_file=str(key_file))
    client = await _client(app)
    try:
        r = await client.get("/login?ticket=t", allow_redirects=False)
        assert r.status == 503 and (await r.json())["field"] == "ticket" and not pg.logins
        key_file.write_text(DEV_KEY)
        r = await client.get("/login?ticket=t", allow_redirects=False)
        assert r.status == 303 and len(pg.logins) == 1
    finally:
        await client.close()


async def test_a_form_login_redirects_and_the_page_embeds_the_token():
    pg, api, app = _app()
    client = await _client(app)
    try:
        r = await client.post("/login", data={"key": DEV_KEY}, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/"
        page = await (await client.get("/")).text()
        (login,) = pg.logins.values()
        assert f'<meta name="csrf-token" content="{login.csrf}">' in page and "{{" not in page
    finally:
        await client.close()


@pytest.mark.parametrize("overrides", [
    {"playground_ticket_sha256": "abc", "playground_ticket_key_file": "/k"},
    {"playground_ticket_sha256": "0" * 64},
    {"playground_ticket_key_file": "/k"},
])
def test_ticket_settings_are_checked(overrides):
    with pytest.raises(SettingsError) as err:
        load_settings(PlaygroundSettings, **overrides)
    assert any("PLAYGROUND_TICKET" in v for v in err.value.variables)


@pytest.mark.parametrize("https", [True, False])
def test_the_login_cookie_is_secure_over_https(https):
    import ssl

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    pg, api, app = _app()
    request = make_mocked_request("POST", "/login", sslcontext=ssl.create_default_context() if https else None)
    response = web.Response()
    pg.logins.set_cookie(response, request, "id")
    cookie = response.cookies["ls_login"]
    assert bool(cookie["secure"]) is https
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
