"""The browser playground: a page that shows a session's avatar live and sends the microphone.

Served by `python -m services.playground` (aiohttp). Everything but the page's login form and
`/healthz` needs a login: the visitor gives an API key of the session API once and gets a cookie.

- `GET /` the page (`?session=<id>`; without one it offers to open a session with the bundled
  sample character); without a login, a form asking for the API key;
- `POST /login` (`{"key": ...}` as JSON, or a form field `key`) checks the key against the session
  API (`ListSessions`), then sets the HttpOnly cookie `ls_login` and answers
  `{"ok": true, "csrf_token": ...}` (a form post is redirected to `/` instead);
- `GET /login?ticket=<t>` logs in with the one-time ticket the dev stack prints (the key it stands
  for is read from `LIVESTAGE_PLAYGROUND_TICKET_KEY_FILE`), once, then redirects to `/`;
- `POST /logout` ends the login;
- `POST /api/sessions` opens and starts such a session in a room of its own, answers
  `{"session_id", "livekit_room"}`;
- `GET /api/sessions/{id}/config` how to watch it: `{"mode": "livekit", "livekit_url", "token"}`
  (a subscribe-only viewer token from the session API) or `{"mode": "stream"}` plus fps, size
  and sample rate;
- `WS /api/sessions/{id}/stream` the project's own stream. Server -> browser, one binary message
  per chunk: 4-byte big-endian header length, a JSON header (`chunk`, `fps`, `speaking`,
  `user_speaking`, `audio_samples`, `jpeg_sizes`), the chunk's speech as 16-bit PCM, then one
  JPEG per frame. Browser -> server: binary 16-bit PCM mono 16 kHz microphone frames (forwarded
  into a `PushUserAudio` stream), and JSON `{"type": "stats", ...}` every half second saying what
  the page actually drew and played (kept for `GET /api/sessions/{id}/stats`);
- `GET /healthz`.

Every call to the session API carries the logged-in visitor's key, so a visitor sees and joins
only the sessions of their own tenant (any other id is "not found"). Requests that change
anything (every POST but the login itself) must carry the login's CSRF token in `X-CSRF-Token`
(the page embeds it); a request whose `Origin` names another site is refused, and the stream
socket requires an `Origin` of this host.

Errors are JSON `{"error": ..., "field": ...}` with a 4xx status; on the socket they are JSON
messages `{"type": "error", ...}` and the socket stays open.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import re
import secrets
import struct
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import grpc
import numpy as np
from aiohttp import WSMsgType, web
from PIL import Image
from pydantic import Field, field_validator, model_validator

from livestage.client import session_channel
from livestage.config import Settings, env_name
from livestage.observability import get_logger
from livestage.playground.logins import LOGIN_COOKIE, Login, Logins, Refusal, check_origin, same_secret
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc
from livestage.transport import Envelope, NatsBus, Subjects, kind_of, to_numpy
from livestage.transport.codec import is_set

MAX_MIC_MESSAGE = 64 * 1024
MAX_TEXT_MESSAGE = 16 * 1024
"""Largest JSON message the page may send on the socket (its stats)."""
MAX_KEY_CHARS = 256
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")
"""What an API key may look like before the session API is asked (printable ASCII, no spaces:
anything else could not even travel as gRPC metadata)."""
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_log = get_logger("playground")


class PlaygroundSettings(Settings):
    playground_host: str = "127.0.0.1"
    playground_port: int = Field(8080, ge=0, le=65535)
    session_address: str = "127.0.0.1:50051"
    """host:port of the session service's gRPC API."""
    livekit_js_url: str = "/static/livekit-client.umd.min.js"
    """Where the page loads the LiveKit JS client from in LiveKit mode (not bundled: put the
    `livekit-client` UMD build there, or point this at your CDN)."""
    jpeg_quality: int = Field(80, ge=10, le=95)
    playground_ticket_sha256: str = ""
    """Hex SHA-256 of a one-time login ticket (`GET /login?ticket=...`); empty: no ticket."""
    playground_ticket_key_file: str = ""
    """File holding the API key the ticket logs in as (required with the ticket)."""
    playground_login_ttl_s: float = Field(12 * 3600, gt=0)
    """A login (its cookie) is good for this long."""
    playground_max_logins: int = Field(1000, ge=1)
    """Logins held at once; beyond, the oldest one ends."""
    playground_max_stats: int = Field(1000, ge=1)
    """Sessions whose page reports are kept; beyond, the oldest report is forgotten."""
    playground_max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest request body the playground reads (413 beyond)."""
    playground_mic_queue: int = Field(64, ge=1, le=4096)
    """Microphone messages waiting for the session API per socket; when full the oldest is dropped."""

    @field_validator("playground_ticket_sha256", mode="before")
    @classmethod
    def _lower_digest(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _ticket(self) -> "PlaygroundSettings":
        sha, key_file = env_name("playground_ticket_sha256"), env_name("playground_ticket_key_file")
        if self.playground_ticket_sha256 and not _SHA256_HEX.match(self.playground_ticket_sha256):
            raise ValueError(f"{sha} must be 64 hex digits (the SHA-256 of the ticket)")
        if bool(self.playground_ticket_sha256) != bool(self.playground_ticket_key_file):
            raise ValueError(f"{sha} and {key_file} go together")
        return self


def _error(status: int, message: str, field: str = "") -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status,
                             headers={"Cache-Control": "no-store"})


def _metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _clean_stats(data: dict) -> dict[str, Any]:
    """What is kept of a page's report: at most 64 short keys with numbers, short strings and
    short lists of short strings (the page is not trusted to stay small)."""
    out: dict[str, Any] = {}
    for k, v in list(data.items())[:64]:
        if not isinstance(k, str) or len(k) > 64:
            continue
        if v is None or isinstance(v, (bool, int)):
            out[k] = v
        elif isinstance(v, float):
            out[k] = v if math.isfinite(v) else None
        elif isinstance(v, str):
            out[k] = v[:200]
        elif isinstance(v, list):
            out[k] = [str(x)[:200] for x in v[-20:]]
    return out


def encode_chunk(chunk_index: int, frames: np.ndarray, audio: np.ndarray, fps: int, speaking: bool = False,
                 user_speaking: bool = False, quality: int = 80) -> bytes:
    """One chunk as the page reads it (see the module docstring)."""
    jpegs = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        jpegs.append(buf.getvalue())
    pcm = (np.clip(np.nan_to_num(audio), -1, 1) * 32767).astype("<i2").tobytes()
    header = json.dumps({"chunk": chunk_index, "fps": fps, "speaking": bool(speaking),
                         "user_speaking": bool(user_speaking), "audio_samples": len(pcm) // 2,
                         "jpeg_sizes": [len(j) for j in jpegs]}).encode()
    return struct.pack(">I", len(header)) + header + pcm + b"".join(jpegs)


class Playground:
    def __init__(self, settings: PlaygroundSettings):
        self.settings = settings
        self.bus: NatsBus | None = None
        self.channel: grpc.aio.Channel | None = None
        self.client: session_pb2_grpc.SessionServiceStub | None = None
        self.stats: OrderedDict[str, dict[str, Any]] = OrderedDict()
        """Page reports by session id (only sessions a logged-in visitor's tenant owns)."""
        self.logins = Logins(settings.playground_login_ttl_s, settings.playground_max_logins)
        self.ticket_used = False

    async def start(self, app: web.Application) -> None:
        self.bus = await NatsBus.from_settings(self.settings, name="playground")
        # one channel for everybody; every call carries its visitor's key as metadata
        self.channel = session_channel(self.settings.session_address, "")
        self.client = session_pb2_grpc.SessionServiceStub(self.channel)

    async def stop(self, app: web.Application) -> None:
        if self.bus is not None:
            await self.bus.close()
        if self.channel is not None:
            await self.channel.close()

    async def _body(self, request: web.Request) -> bytes:
        limit = self.settings.playground_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Refusal(413, f"request body over {limit} bytes", "body")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refusal(413, f"request body over {limit} bytes", "body") from None

    async def _json_object(self, request: web.Request, optional: bool = False) -> dict:
        raw = await self._body(request)
        if optional and not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise Refusal(400, "the body must be a JSON object", "body") from None
        if not isinstance(data, dict):
            raise Refusal(400, "the body must be a JSON object", "body")
        return data

    async def _verify_key(self, key: str) -> None:
        """Asks the session API whether `key` is good (`ListSessions(limit=1)` with it)."""
        assert self.client is not None
        try:
            await self.client.ListSessions(pb.ListSessionsRequest(limit=1), metadata=_metadata(key), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise Refusal(401, "this API key is not accepted", "key") from None
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Refusal(429, f"session service: {exc.details()}", "key") from None
            raise Refusal(503, f"session service: {exc.details()}") from None

    def _rpc_refusal(self, exc: grpc.aio.AioRpcError, login_id: str, field: str = "session") -> Refusal:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.NOT_FOUND:
            return Refusal(404, "session not found", "session")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return Refusal(400, details, field)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return Refusal(409, details, "session")
        if code == grpc.StatusCode.UNAUTHENTICATED:  # the key was revoked since the login
            self.logins.drop(login_id)
            return Refusal(401, "the API key of this login is no longer accepted: log in again", LOGIN_COOKIE)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            named = details.split(":", 1)[0]
            return Refusal(429, details, named if re.fullmatch(r"[a-z_.]{1,40}", named) else "")
        return Refusal(503, f"session service: {details}")

    @staticmethod
    def _session_id(request: web.Request) -> str:
        sid = request.match_info.get("session_id", "")
        if not _SESSION_ID.match(sid):
            raise Refusal(400, "session id: letters, digits, '_' and '-', at most 64", "session")
        return sid

    async def _own_session(self, sid: str, login_id: str, login: Login) -> pb.Session:
        """The session if the visitor's tenant owns it (else 404, like an unknown id)."""
        assert self.client is not None
        try:
            return await self.client.GetSession(pb.SessionRef(session_id=sid), metadata=_metadata(login.key),
                                                timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_refusal(exc, login_id) from None

    # -- pages and login -------------------------------------------------------------------
    @staticmethod
    def _static_text(name: str) -> str:
        return (resources.files("livestage.playground") / "static" / name).read_text()

    def _login_page(self, status: int = 200) -> web.Response:
        return web.Response(text=self._static_text("login.html"), content_type="text/html", status=status,
                            headers={"Cache-Control": "no-store"})

    async def index(self, request: web.Request) -> web.Response:
        current = self.logins.current(request)
        if current is None:
            return self._login_page()
        js_url = json.dumps(self.settings.livekit_js_url).replace("</", "<\\/")
        html = (self._static_text("index.html").replace("{{LIVEKIT_JS_URL}}", js_url)
                .replace("{{CSRF_TOKEN}}", current[1].csrf))
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def login(self, request: web.Request) -> web.Response:
        check_origin(request)
        is_form = request.content_type == "application/x-www-form-urlencoded"
        if is_form:
            raw = await self._body(request)
            try:
                body: dict = dict(parse_qsl(raw.decode("utf-8"), max_num_fields=16, strict_parsing=bool(raw)))
            except (ValueError, UnicodeDecodeError):
                raise Refusal(400, "malformed form body", "body") from None
        else:
            body = await self._json_object(request)
        key = body.get("key")
        if not isinstance(key, str) or not key.strip():
            raise Refusal(400, "the API key is required", "key")
        key = key.strip()
        if len(key) > MAX_KEY_CHARS or not _KEY_CHARS.match(key):
            raise Refusal(401, "this API key is not accepted", "key")
        await self._verify_key(key)
        login_id, login = self.logins.new(key)
        response: web.Response
        if is_form:
            response = web.Response(status=303, headers={"Location": "/"})
        else:
            response = web.json_response({"ok": True, "csrf_token": login.csrf,
                                          "expires_in_s": self.settings.playground_login_ttl_s},
                                         headers={"Cache-Control": "no-store"})
        self.logins.set_cookie(response, request, login_id)
        return response

    async def ticket_login(self, request: web.Request) -> web.Response:
        """`GET /login?ticket=...`: the dev stack's one-time link. Without a ticket: the form."""
        ticket = request.query.get("ticket")
        if ticket is None:
            return self._login_page()
        expected = self.settings.playground_ticket_sha256
        digest = hashlib.sha256(ticket.encode("utf-8", "surrogateescape")).hexdigest()
        if not expected or not same_secret(digest, expected):
            raise Refusal(403, "this login ticket is not valid", "ticket")
        if self.ticket_used:
            raise Refusal(403, "this login ticket has been used already: log in with the API key", "ticket")
        self.ticket_used = True
        try:
            try:
                key = Path(self.settings.playground_ticket_key_file).read_text().strip()
            except OSError as exc:
                raise Refusal(503, f"cannot read the ticket's key file: {exc.strerror}", "ticket") from None
            if not key or len(key) > MAX_KEY_CHARS or not _KEY_CHARS.match(key):
                raise Refusal(503, "the ticket's key file holds no API key", "ticket")
            try:
                await self._verify_key(key)
            except Refusal as refusal:
                raise Refusal(503, f"the ticket's API key: {refusal.message}", "ticket") from None
        except BaseException:
            self.ticket_used = False  # not spent: the operator may retry once the problem is fixed
            raise
        login_id, _ = self.logins.new(key)
        sid = request.query.get("session", "")
        response = web.Response(status=303, headers={
            "Location": f"/?session={sid}" if _SESSION_ID.match(sid) else "/", "Cache-Control": "no-store"})
        self.logins.set_cookie(response, request, login_id)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        login_id, _ = self.logins.state_changing(request)
        self.logins.drop(login_id)
        response = web.json_response({"ok": True})
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response

    # -- sessions --------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        from livestage.devstack.demo import SampleCharacter, character_proto

        login_id, login = self.logins.state_changing(request)
        await self._json_object(request, optional=True)  # no options yet; bounded and checked all the same
        assert self.client is not None
        sample = SampleCharacter.load()
        md = _metadata(login.key)
        try:
            # an empty room: the session API makes one for this session alone
            s = await self.client.CreateSession(pb.CreateSessionRequest(
                character=character_proto(sample), livekit_room="",
                options=pb.SessionOptions(realtime=True)), metadata=md, timeout=120)
            try:
                await self.client.StartSession(pb.SessionRef(session_id=s.session_id), metadata=md, timeout=120)
            except grpc.aio.AioRpcError:
                try:
                    await self.client.EndSession(pb.SessionRef(session_id=s.session_id), metadata=md, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    _log.warning("end_after_failed_start", session_id=s.session_id, error=exc.details())
                raise
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_refusal(exc, login_id, field="character") from None
        return web.json_response({"session_id": s.session_id, "livekit_room": s.livekit_room})

    async def config(self, request: web.Request) -> web.Response:
        from livestage.models.config import get_preset

        login_id, login = self.logins.require(request)
        sid = self._session_id(request)
        session = await self._own_session(sid, login_id, login)
        preset = get_preset(session.preset or self.settings.preset)
        out: dict[str, Any] = {"session_id": sid, "fps": preset.chunk.fps, "width": preset.width,
                               "height": preset.height, "sample_rate": preset.chunk.sample_rate,
                               "mode": "stream"}
        if session.livekit_url and session.livekit_room:
            identity = request.query.get("identity") or f"viewer-{secrets.token_hex(4)}"
            assert self.client is not None
            try:
                tok = await self.client.CreateViewerToken(pb.ViewerTokenRequest(session_id=sid, identity=identity),
                                                          metadata=_metadata(login.key), timeout=10)
            except grpc.aio.AioRpcError as exc:
                raise self._rpc_refusal(exc, login_id, field="identity") from None
            out.update(mode="livekit", livekit_url=tok.livekit_url, token=tok.token, room=tok.room)
        return web.json_response(out, headers={"Cache-Control": "no-store"})

    async def get_stats(self, request: web.Request) -> web.Response:
        login_id, login = self.logins.require(request)
        sid = self._session_id(request)
        await self._own_session(sid, login_id, login)
        if sid not in self.stats:
            return _error(404, f"no page has reported for session {sid!r}", "session")
        return web.json_response(self.stats[sid], headers={"Cache-Control": "no-store"})

    def _keep_stats(self, sid: str, data: dict) -> None:
        self.stats[sid] = _clean_stats(data)
        self.stats.move_to_end(sid)
        while len(self.stats) > self.settings.playground_max_stats:
            self.stats.popitem(last=False)

    # -- the stream --------------------------------------------------------------------------
    async def stream(self, request: web.Request) -> web.StreamResponse:
        check_origin(request, required=True)
        login_id, login = self.logins.require(request)
        sid = self._session_id(request)
        ws = web.WebSocketResponse(max_msg_size=4 * MAX_MIC_MESSAGE, heartbeat=30)
        if not ws.can_prepare(request).ok:
            raise Refusal(400, "this endpoint is a WebSocket (send an Upgrade request)", "Upgrade")
        await self._own_session(sid, login_id, login)
        await ws.prepare(request)
        assert self.bus is not None and self.client is not None
        send_lock = asyncio.Lock()
        md = _metadata(login.key)

        async def send_error(field: str, message: str) -> None:
            async with send_lock:
                if not ws.closed:
                    await ws.send_json({"type": "error", "field": field, "error": message})

        async def on_frames(env: Envelope, headers: dict[str, str], reply: str) -> None:
            if kind_of(env) != "frame_chunk":
                return
            fc = env.frame_chunk
            try:
                frames = to_numpy(fc.frames, "frames")
                audio = to_numpy(fc.audio, "audio") if is_set(fc.audio) else np.zeros(0, np.float32)
                if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                    raise ValueError(f"frames: expected uint8 [T, H, W, 3], got {frames.dtype} "
                                     f"{list(frames.shape)}")
            except ValueError as exc:  # a malformed chunk is skipped; the stream goes on
                _log.warning("frames_dropped", session_id=sid, chunk=env.chunk_index, error=str(exc))
                return
            data = await asyncio.to_thread(encode_chunk, env.chunk_index, frames, audio, int(frames.shape[0]),
                                           fc.speaking, fc.user_speaking, self.settings.jpeg_quality)
            async with send_lock:
                if not ws.closed:
                    try:
                        await ws.send_bytes(data)
                    except (ConnectionError, RuntimeError):
                        pass  # the socket is going away; the receive loop ends it

        sub = await self.bus.subscribe(Subjects.session_frames(sid), on_frames)
        mic: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=self.settings.playground_mic_queue)
        dropped_reported = 0.0

        def offer(pcm: bytes | None) -> bool:
            """Queues a mic message; when the queue is full the oldest waiting one goes."""
            dropped = False
            while mic.full():
                mic.get_nowait()
                dropped = True
            mic.put_nowait(pcm)
            return dropped

        async def mic_frames():
            while True:
                pcm = await mic.get()
                if pcm is None:
                    return
                yield pb.AudioChunk(session_id=sid, pcm16=pcm, sample_rate=16000, channels=1)

        async def push_mic() -> pb.PushAudioSummary:
            assert self.client is not None
            return await self.client.PushUserAudio(mic_frames(), metadata=md)

        pusher: asyncio.Task | None = None
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    if len(msg.data) % 2 or len(msg.data) > MAX_MIC_MESSAGE:
                        await send_error("pcm16", f"mic frames are 16-bit PCM up to {MAX_MIC_MESSAGE} bytes, "
                                                  f"got {len(msg.data)} bytes")
                        continue
                    if pusher is not None and pusher.done():
                        exc = None if pusher.cancelled() else pusher.exception()
                        if isinstance(exc, grpc.aio.AioRpcError):
                            await send_error("pcm16", f"session service: {exc.details()}")
                        pusher = None
                    if pusher is None:
                        pusher = asyncio.create_task(push_mic())
                    if offer(bytes(msg.data)) and time.monotonic() - dropped_reported > 1.0:
                        dropped_reported = time.monotonic()
                        await send_error("pcm16", "microphone audio arrives faster than the session takes it: "
                                                  "the oldest waiting audio was dropped")
                elif msg.type == WSMsgType.TEXT:
                    if len(msg.data) > MAX_TEXT_MESSAGE:
                        await send_error("message", f"text messages are at most {MAX_TEXT_MESSAGE} bytes")
                        continue
                    try:
                        data = json.loads(msg.data)
                    except (ValueError, RecursionError):
                        await send_error("message", "not JSON")
                        continue
                    if isinstance(data, dict) and data.get("type") == "stats":
                        self._keep_stats(sid, data)
        except Exception as exc:  # noqa: BLE001 - the socket ends, the server goes on
            _log.warning("stream_failed", session_id=sid, error=repr(exc))
        finally:
            await sub.unsubscribe()
            offer(None)
            if pusher is not None:
                try:
                    await asyncio.wait_for(pusher, 5)
                except (asyncio.TimeoutError, grpc.aio.AioRpcError) as exc:
                    _log.warning("mic_stream_ended", session_id=sid, error=repr(exc))
        return ws


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every refusal as JSON `{"error", "field"}`, aiohttp's own ones (404, 405, 413) included."""
    try:
        return await handler(request)
    except Refusal as r:
        return _error(r.status, r.message, r.field)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        field = {404: "path", 405: "method", 413: "body"}.get(exc.status, "")
        return _error(exc.status, exc.reason, field)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: logged, answered, and the server goes on
        _log.exception("request_failed", path=request.path, error=repr(exc))
        return _error(500, "internal error")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


PLAYGROUND = web.AppKey("playground", Playground)
"""`app[PLAYGROUND]`: the app's `Playground`."""


def create_app(settings: PlaygroundSettings) -> web.Application:
    pg = Playground(settings)
    app = web.Application(client_max_size=settings.playground_max_body_bytes, middlewares=[_json_errors])
    app[PLAYGROUND] = pg
    app.on_startup.append(pg.start)
    app.on_cleanup.append(pg.stop)
    app.on_response_prepare.append(_security_headers)
    static = resources.files("livestage.playground") / "static"
    app.router.add_get("/", pg.index)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/login", pg.ticket_login)
    app.router.add_post("/login", pg.login)
    app.router.add_post("/logout", pg.logout)
    app.router.add_post("/api/sessions", pg.create)
    app.router.add_get("/api/sessions/{session_id}/config", pg.config)
    app.router.add_get("/api/sessions/{session_id}/stats", pg.get_stats)
    app.router.add_get("/api/sessions/{session_id}/stream", pg.stream)
    app.router.add_static("/static", str(static))
    return app


def run_playground() -> None:
    from livestage.config import load_settings
    from livestage.observability import configure_logging

    settings = load_settings(PlaygroundSettings, service="playground")
    configure_logging("playground", settings.log_level)
    web.run_app(create_app(settings), host=settings.playground_host, port=settings.playground_port,
                print=None)
