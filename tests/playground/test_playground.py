"""The browser playground against a real stack (nats, redis, services, the playground process),
and in Debian's Chromium, headless, with a fake microphone playing a WAV file. The stack
(`pg_stack`, in conftest.py) has the dev tenant and a second tenant `other`."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import subprocess
import time

import aiohttp
import numpy as np
import pytest
from PIL import Image

from livestage.devstack.__main__ import banner
from livestage.media.audio import write_wav
from livestage.media.samples import sample_speech
from livestage.playground import encode_chunk
from livestage.protos import session_pb2 as pb

from integration.helpers import audio_stream, stub
from playground.helpers import (base_url, end_session, http_client, login, session_state, start_session)


def parse_chunk(data: bytes) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    (hlen,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + hlen])
    off = 4 + hlen
    audio = np.frombuffer(data[off:off + 2 * header["audio_samples"]], "<i2")
    off += 2 * header["audio_samples"]
    frames = []
    for size in header["jpeg_sizes"]:
        frames.append(np.asarray(Image.open(io.BytesIO(data[off:off + size]))))
        off += size
    assert off == len(data)
    return header, audio, frames


def test_chunk_encoding_round_trips():
    ramp = np.linspace(0, 255, 32).astype(np.uint8)  # smooth pictures: JPEG keeps them close
    frames = np.stack([np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((32, 32), 40 * k, np.uint8)), -1)
                       for k in range(8)]).astype(np.uint8)
    audio = np.linspace(-0.5, 0.5, 16000).astype(np.float32)
    header, pcm, decoded = parse_chunk(encode_chunk(3, frames, audio, 8, speaking=True, quality=95))
    assert header["chunk"] == 3 and header["speaking"] and not header["user_speaking"]
    assert len(decoded) == 8 and decoded[0].shape == (32, 32, 3)
    assert all(np.abs(d.astype(int) - f).mean() < 4 for d, f in zip(decoded, frames))
    assert np.allclose(pcm / 32767, audio, atol=1e-4)


async def test_config_stream_and_microphone_over_http(pg_stack):
    base = base_url(pg_stack)
    sid = await start_session(pg_stack)
    try:
        async with http_client() as http:
            await login(http, pg_stack)
            async with http.get(f"{base}/api/sessions/nope/config") as r:
                assert r.status == 404 and (await r.json())["field"] == "session"
            async with http.get(f"{base}/api/sessions/{sid}/config") as r:
                cfg = await r.json()
            assert cfg["mode"] == "stream" and (cfg["fps"], cfg["width"], cfg["sample_rate"]) == (8, 32, 16000)
            async with http.get(f"{base}/") as r:
                assert r.status == 200 and "LiveStage playground" in await r.text()
            async with http.ws_connect(f"{base}/api/sessions/{sid}/stream", origin=base) as ws:
                msg = await ws.receive(timeout=30)
                header, audio, frames = parse_chunk(msg.data)
                assert len(frames) == 8 and frames[0].shape == (32, 32, 3) and audio.size == 16000
                await ws.send_bytes(b"\x00\x01\x02")  # not whole 16-bit samples
                while True:
                    msg = await ws.receive(timeout=30)
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        err = json.loads(msg.data)
                        assert err["type"] == "error" and err["field"] == "pcm16"
                        break
                # the user's voice through the socket reaches the session: chunks start hearing it
                voice = (sample_speech(6.0, 16000, seed=2) * 32767).astype("<i2").tobytes()
                for i in range(0, len(voice), 3200):
                    await ws.send_bytes(voice[i:i + 3200])
                heard = False
                deadline = time.monotonic() + 40
                while not heard and time.monotonic() < deadline:
                    msg = await ws.receive(timeout=30)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        heard = parse_chunk(msg.data)[0]["user_speaking"]
                assert heard, "microphone audio sent over the socket never reached the session"
    finally:
        await end_session(pg_stack, sid)


async def test_login_with_a_wrong_key_is_refused_and_sets_no_cookie(pg_stack):
    base = base_url(pg_stack)
    async with http_client() as http:
        async with http.get(f"{base}/") as r:  # no login: the page is the login form
            page = await r.text()
            assert r.status == 200 and 'name="key"' in page and "csrf-token" not in page
        async with http.post(f"{base}/login", json={"key": "lsk_" + "Q" * 43}) as r:
            assert r.status == 401 and (await r.json())["field"] == "key"
            assert "ls_login" not in r.cookies
        async with http.get(f"{base}/api/sessions/x/config") as r:
            assert r.status == 401 and (await r.json())["field"] == "ls_login"
        # the other tenant's key is a good key: it logs in
        assert await login(http, pg_stack, pg_stack.credentials.tenant_keys["other"])


async def test_login_cookie_is_strict_and_httponly_and_logout_ends_it(pg_stack):
    base = base_url(pg_stack)
    async with http_client() as http:
        async with http.post(f"{base}/login", json={"key": pg_stack.api_key}) as r:
            assert r.status == 200
            token = (await r.json())["csrf_token"]
            cookie = r.cookies["ls_login"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert not cookie["secure"]  # plain http on loopback; https requests get Secure
        assert len(cookie.value) >= 32 and cookie.value != token
        async with http.get(f"{base}/") as r:
            page = await r.text()
        assert f'<meta name="csrf-token" content="{token}">' in page and 'id="new"' in page
        async with http.post(f"{base}/logout") as r:  # no token: refused, still logged in
            assert r.status == 403 and (await r.json())["field"] == "X-CSRF-Token"
        async with http.get(f"{base}/api/sessions/x/config") as r:
            assert r.status == 404
        async with http.post(f"{base}/logout", headers={"X-CSRF-Token": token}) as r:
            assert r.status == 200
        async with http.get(f"{base}/api/sessions/x/config", headers={"Cookie": f"ls_login={cookie.value}"}) as r:
            assert r.status == 401 and (await r.json())["field"] == "ls_login"


async def test_the_stacks_one_time_link_logs_in_once(pg_stack):
    url = pg_stack.playground_login_url
    assert url.startswith(f"{base_url(pg_stack)}/login?ticket=") and pg_stack.api_key not in url
    async with http_client() as http:
        async with http.get(url, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
            assert r.cookies["ls_login"]["httponly"]
        async with http.get(f"{base_url(pg_stack)}/") as r:
            assert 'name="csrf-token"' in await r.text()
    async with http_client() as http:
        async with http.get(url, allow_redirects=False) as r:
            assert r.status == 403 and (await r.json())["field"] == "ticket"
            assert "ls_login" not in r.cookies
        async with http.get(url.split("=")[0] + "=" + "x" * 43, allow_redirects=False) as r:
            assert r.status == 403 and (await r.json())["field"] == "ticket"


def test_make_up_prints_where_things_are_but_no_secret(pg_stack):
    text = "\n".join(banner(pg_stack))
    creds = pg_stack.credentials
    assert pg_stack.playground_login_url in text and str(creds.api_key_file) in text
    assert f"127.0.0.1:{pg_stack.redis.port}" in text and pg_stack.session_address in text
    for secret in (creds.api_key, creds.redis_password, *creds.nats_passwords.values(), *creds.tenant_keys.values()):
        assert secret not in text


async def _count_sessions(pg_stack) -> int:
    channel, client = stub(pg_stack)
    try:
        return len((await client.ListSessions(pb.ListSessionsRequest(limit=1000))).sessions)
    finally:
        await channel.close()


async def test_creating_needs_the_csrf_token_and_a_same_site_origin(pg_stack):
    base = base_url(pg_stack)
    before = await _count_sessions(pg_stack)
    async with http_client() as http:
        token = await login(http, pg_stack)
        async with http.post(f"{base}/api/sessions") as r:
            assert r.status == 403 and (await r.json())["field"] == "X-CSRF-Token"
        async with http.post(f"{base}/api/sessions", headers={"X-CSRF-Token": token[:-1] + "A"}) as r:
            assert r.status == 403 and (await r.json())["field"] == "X-CSRF-Token"
        async with http.post(f"{base}/api/sessions", headers={"X-CSRF-Token": token,
                                                              "Origin": "https://evil.example"}) as r:
            assert r.status == 403 and (await r.json())["field"] == "Origin"
    assert await _count_sessions(pg_stack) == before, "a refused request must not open a session"


async def test_the_stream_needs_the_login_cookie_and_a_same_host_origin(pg_stack, hostile_context):
    base, sid = base_url(pg_stack), hostile_context.canary
    async with http_client() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{base}/api/sessions/{sid}/stream", origin=base)
        assert refused.value.status == 401
        await login(http, pg_stack)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{base}/api/sessions/{sid}/stream", origin="http://evil.example")
        assert refused.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{base}/api/sessions/{sid}/stream")  # no Origin at all
        assert refused.value.status == 403
        async with http.ws_connect(f"{base}/api/sessions/{sid}/stream", origin=base) as ws:
            msg = await ws.receive(timeout=30)  # with both, the canary's frames flow
            assert msg.type == aiohttp.WSMsgType.BINARY and parse_chunk(msg.data)[0]["chunk"] >= 0


async def test_every_playground_session_gets_a_room_of_its_own(pg_stack):
    base = base_url(pg_stack)
    sids = []
    try:
        async with http_client() as http:
            token = await login(http, pg_stack)
            for _ in range(2):
                async with http.post(f"{base}/api/sessions", headers={"X-CSRF-Token": token}) as r:
                    body = await r.json()
                    assert r.status == 200, body
                    sids.append(body["session_id"])
        rooms = [(await session_state(pg_stack, sid)).livekit_room for sid in sids]
        assert rooms[0] != rooms[1]
        assert rooms == [f"dev_s-{sid}" for sid in sids] and all(r.startswith("dev_s-") for r in rooms)
        states = [(await session_state(pg_stack, sid)).state for sid in sids]
        assert pb.SESSION_STATE_ENDED not in states and pb.SESSION_STATE_UNSPECIFIED not in states
    finally:
        for sid in sids:
            await end_session(pg_stack, sid)


async def test_another_tenants_session_is_not_found(pg_stack, hostile_context):
    base = base_url(pg_stack)
    other_key = pg_stack.credentials.tenant_keys["other"]
    theirs = hostile_context.foreign
    ours = hostile_context.canary
    async with http_client() as dev, http_client() as other:
        await login(dev, pg_stack)
        await login(other, pg_stack, other_key)
        for path in ("config", "stats"):
            async with dev.get(f"{base}/api/sessions/{theirs}/{path}") as r:
                assert r.status == 404 and (await r.json())["field"] == "session", path
            async with other.get(f"{base}/api/sessions/{ours}/{path}") as r:
                assert r.status == 404 and (await r.json())["field"] == "session", path
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await other.ws_connect(f"{base}/api/sessions/{ours}/stream", origin=base)
        assert refused.value.status == 404
        # each tenant sees its own session
        async with other.get(f"{base}/api/sessions/{theirs}/config") as r:
            assert r.status == 200 and (await r.json())["session_id"] == theirs
        async with dev.get(f"{base}/api/sessions/{ours}/config") as r:
            assert r.status == 200


class Cdp:
    """The few Chrome DevTools Protocol calls the browser test needs, over the page's socket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg.get("result", {})

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = await self.eval(expression)
            except RuntimeError:  # the page is navigating
                value = None
            if value:
                return value
            await asyncio.sleep(0.2)
        raise TimeoutError(f"page never satisfied {expression}")


async def _page_socket(http: aiohttp.ClientSession, profile) -> aiohttp.ClientWebSocketResponse:
    deadline = time.monotonic() + 30
    port_file = profile / "DevToolsActivePort"
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline, "chromium never opened its DevTools port"
        await asyncio.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    while True:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in await r.json() if t.get("type") == "page"]
        if pages:
            return await http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        assert time.monotonic() < deadline, "chromium shows no page"
        await asyncio.sleep(0.1)


def test_page_in_headless_chromium_logs_in_opens_a_session_and_draws_frames_that_change(pg_stack, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary (scripts/setup_env.sh installs Debian's chromium)")
    base = base_url(pg_stack)
    wav = tmp_path / "mic.wav"
    write_wav(wav, sample_speech(20.0, 16000, seed=4), 16000)
    profile = tmp_path / "profile"
    proc = subprocess.Popen([
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", f"{base}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def drive() -> tuple[str, dict, dict]:
        async with http_client() as http:
            page = Cdp(await _page_socket(http, profile))
            # the login form, filled in and sent as a visitor would
            await page.wait_for("!!document.getElementById('key')")
            await page.eval(f"document.getElementById('key').value = {json.dumps(pg_stack.api_key)};"
                            "document.getElementById('login').requestSubmit(); true")
            await page.wait_for("!!document.querySelector('meta[name=\"csrf-token\"]')")
            # the page's own button opens a session (a POST that needs the page's CSRF token)
            await page.eval("document.getElementById('new').click(); true")
            sid = await page.wait_for("new URLSearchParams(location.search).get('session')")
            await page.ws.close()
            await login(http, pg_stack)

            async def stats() -> dict:
                async with http.get(f"{base}/api/sessions/{sid}/stats") as r:
                    return await r.json() if r.status == 200 else {}

            deadline = time.monotonic() + 60
            before = {}
            while time.monotonic() < deadline:
                before = await stats()
                if before.get("frames_drawn", 0) >= 16:
                    break
                await asyncio.sleep(0.5)
            channel, client = stub(pg_stack)
            await client.PushSpeakAudio(audio_stream(sid, sample_speech(6.0, 16000, seed=5)))
            await channel.close()
            after = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                after = await stats()
                if after.get("distinct_speaking_frames", 0) >= 8 and after.get("mic_bytes_sent", 0) > 0:
                    break
                await asyncio.sleep(0.5)
            return sid, before, after

    sid = ""
    try:
        sid, before, after = asyncio.run(drive())
    finally:
        proc.terminate()
        proc.wait(10)
        if sid:
            asyncio.run(end_session(pg_stack, sid))
    assert before.get("frames_drawn", 0) >= 16 and before["mode"] == "stream", before
    assert after["frames_drawn"] > before["frames_drawn"] and after["speaking_chunks"] >= 1, after
    assert after["distinct_speaking_frames"] >= 8, "frames must change while the character speaks"
    assert after["mic_bytes_sent"] > 0 and not [e for e in after["errors"] if "mic" in e], after
