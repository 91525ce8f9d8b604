"""`NatsBus`: publish / subscribe / request typed stage messages (`StageEnvelope`) over NATS.

Every message carries the W3C trace context of the sender's current span in its headers (see
`livestage.observability.extract_context` on the receiving side), plus `ls-*` headers naming its
kind, session, chunk and epoch.

Oversized messages. NATS refuses bodies above the server's `max_payload` (1 MB by default; our
nats.conf raises it to 8 MB, which keeps splitting rare in dev). Anything larger is split into
parts, and the receiving side of `subscribe` reassembles them before the handler sees the
message, in one of two ways:

- push (default): the parts are published one after another on the subject itself (headers
  `ls-msg`, `ls-part`, `ls-parts`) and every subscriber reassembles them. Cheap and right for
  sticky worker subjects, inboxes and fan-out subjects (frames to any number of listeners).
- pull (queue subjects, `ls.<stage>.work`): NATS hands each *message* of a queue group to a
  random member, so pushed parts would scatter across workers. Instead a small manifest travels
  on the subject (headers `ls-blob`, `ls-parts`, `ls-size`); the member that gets it fetches the
  parts from the sender on a private inbox. The sender keeps the bytes until they are fetched
  (once, by default) or `blob_ttl_s` passes; `close()` waits briefly for pending fetches.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from livestage.observability.logging import get_logger
from livestage.observability.metrics import METRICS
from livestage.observability.tracing import inject_headers
from livestage.transport.codec import Envelope, check_codec, decode, encode, kind_of, message_headers
from livestage.transport.subjects import Subjects, inbox_prefix

__all__ = ["Handler", "NatsBus", "NoRespondersError"]

Handler = Callable[[Envelope, dict[str, str], str], Awaitable[None]]
"""`handler(message, headers, reply_subject)`; reply is "" when the sender expects none."""

H_MSG, H_PART, H_PARTS = "ls-msg", "ls-part", "ls-parts"
H_BLOB, H_SIZE = "ls-blob", "ls-size"
_INTERNAL = frozenset({H_MSG, H_PART, H_PARTS, H_BLOB, H_SIZE})
_STATUS = "Status"
_MAX_PARTS = 100_000
_log = get_logger("livestage.transport")


class NoRespondersError(TimeoutError):
    """Nobody is subscribed to a request's subject. Raised at once rather than after the timeout;
    a TimeoutError so callers handling "no answer" need no second except clause."""


def _header_bytes(headers: Mapping[str, str]) -> int:
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


@dataclass
class _Partial:
    total: int
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    started: float = field(default_factory=time.monotonic)


class _Reassembler:
    """Collects pushed parts per message id; forgets incomplete messages after `ttl_s` and caps
    the bytes held, so a sender dying mid-message cannot grow a receiver's memory forever."""

    def __init__(self, ttl_s: float, max_bytes: int):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._pending: dict[str, _Partial] = {}

    def add(self, headers: Mapping[str, str], data: bytes) -> bytes | None:
        now = time.monotonic()
        for k in [k for k, v in self._pending.items() if now - v.started > self.ttl_s]:
            del self._pending[k]
            METRICS.errors.labels(kind="transport_parts_expired").inc()
        key = headers[H_MSG]
        total, index = int(headers[H_PARTS]), int(headers[H_PART])
        if not 0 < total <= _MAX_PARTS or not 0 <= index < total:
            raise ValueError(f"bad part header {index}/{total}")
        p = self._pending.setdefault(key, _Partial(total=total))
        if index not in p.parts:
            p.parts[index] = data
            p.size += len(data)
        while sum(v.size for v in self._pending.values()) > self.max_bytes and len(self._pending) > 1:
            oldest = min((k for k in self._pending if k != key), key=lambda k: self._pending[k].started)
            del self._pending[oldest]
            METRICS.errors.labels(kind="transport_parts_dropped").inc()
        if len(p.parts) < p.total:
            return None
        del self._pending[key]
        return b"".join(p.parts[i] for i in range(p.total))


@dataclass
class _Blob:
    parts: list[bytes]
    fetches_left: int | None
    expires: float
    sub: Subscription | None = None
    fetched: asyncio.Event = field(default_factory=asyncio.Event)


class NatsBus:
    """Async NATS client for typed stage messages; create with `await NatsBus.connect(url)`."""

    def __init__(self, nc: Client, *, max_payload: int | None = None, blob_ttl_s: float = 30.0,
                 part_timeout_s: float = 30.0, reassembly_max_bytes: int = 1 << 30):
        self.nc = nc
        self._limit = max_payload
        self.blob_ttl_s = blob_ttl_s
        self.part_timeout_s = part_timeout_s
        self.reassembly_max_bytes = reassembly_max_bytes
        self._blobs: dict[str, _Blob] = {}
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, name: str = "livestage", *, max_payload: int | None = None,
                      **kwargs: Any) -> "NatsBus":
        """Connects (reconnecting forever on loss, since workers must outlive NATS restarts).

        `max_payload` lowers the size above which messages are split (the server's limit always
        applies); other keyword arguments go to `nats.connect`.
        """
        async def on_error(exc: Exception) -> None:
            METRICS.errors.labels(kind="nats").inc()
            _log.warning("nats_error", error=repr(exc))

        async def on_disconnected() -> None:
            _log.warning("nats_disconnected", url=url)

        async def on_reconnected() -> None:
            _log.info("nats_reconnected", url=url)

        options: dict[str, Any] = {"name": name, "max_reconnect_attempts": -1,
                                   "reconnect_time_wait": 0.2, "error_cb": on_error,
                                   "disconnected_cb": on_disconnected,
                                   "reconnected_cb": on_reconnected}
        options.update(kwargs)
        nc = await nats.connect(url, **options)
        return cls(nc, max_payload=max_payload)

    @classmethod
    async def from_settings(cls, settings: Any, name: str) -> "NatsBus":
        """Connects as a service: its NATS user and inbox prefix, TLS when a CA is configured, and
        `LIVESTAGE_MAX_PAYLOAD` as the split size."""
        kwargs: dict[str, Any] = {"inbox_prefix": inbox_prefix(settings.nats_user)}
        if settings.nats_user:
            kwargs.update(user=settings.nats_user, password=settings.nats_password)
        if settings.nats_tls_ca:
            kwargs["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca)
        return await cls.connect(settings.nats_url, name=name, max_payload=settings.max_payload, **kwargs)

    @property
    def max_payload(self) -> int:
        """The server's max_payload (what the connection announced)."""
        return int(self.nc.max_payload)

    def part_limit(self, headers: Mapping[str, str]) -> int:
        """Largest body that fits in one message with these headers."""
        limit = self.max_payload if self._limit is None else min(self.max_payload, self._limit)
        return max(limit - _header_bytes(headers) - 512, 1024)

    # -- sending ---------------------------------------------------------------------------

    async def publish(self, subject: str, msg: Envelope, reply: str = "",
                      headers: Mapping[str, str] | None = None, *, pull: bool | None = None,
                      fetches: int | None = 1) -> None:
        """Publishes one stage message, splitting it if it exceeds the server's max_payload.

        `pull` picks how a split message travels (module doc); None means pull exactly for queue
        subjects. `fetches` is how many receivers may pull it (None: any number until
        `blob_ttl_s`), e.g. None for a non-queue subject with several listeners forced to pull.
        """
        await self.publish_bytes(subject, encode(msg), reply,
                                 {**message_headers(msg), **(headers or {})}, pull=pull,
                                 fetches=fetches)

    async def publish_bytes(self, subject: str, data: bytes, reply: str = "",
                            headers: Mapping[str, str] | None = None, *, pull: bool | None = None,
                            fetches: int | None = 1) -> None:
        """Publishes an encoded body with trace context, split as needed (see `publish`)."""
        hdrs = inject_headers(headers)
        limit = self.part_limit(hdrs)
        if len(data) <= limit:
            await self.nc.publish(subject, data, reply=reply, headers=hdrs)
            return
        limit = self.part_limit({**hdrs, H_MSG: "x" * 32, H_PART: "99999", H_PARTS: "99999",
                                 H_BLOB: "_INBOX." + "x" * 60, H_SIZE: "9" * 12})
        view = memoryview(data)
        parts = [bytes(view[i:i + limit]) for i in range(0, len(data), limit)]
        if len(parts) > _MAX_PARTS:
            raise ValueError(f"message of {len(data)} bytes needs more than {_MAX_PARTS} parts")
        if pull if pull is not None else Subjects.is_queue_subject(subject):
            blob_subject = await self._offer_blob(parts, fetches)
            await self.nc.publish(subject, b"", reply=reply, headers={
                **hdrs, H_BLOB: blob_subject, H_PARTS: str(len(parts)), H_SIZE: str(len(data))})
            return
        msg_id = uuid.uuid4().hex
        for i, part in enumerate(parts):
            await self.nc.publish(subject, part, reply=reply, headers={
                **hdrs, H_MSG: msg_id, H_PART: str(i), H_PARTS: str(len(parts))})

    async def _offer_blob(self, parts: list[bytes], fetches: int | None) -> str:
        subject = self.nc.new_inbox() + ".blob"
        blob = _Blob(parts, fetches, time.monotonic() + self.blob_ttl_s)

        async def serve(req: Msg) -> None:
            if not req.reply or subject not in self._blobs:
                return
            for i, part in enumerate(blob.parts):
                await self.nc.publish(req.reply, part, headers={H_PART: str(i),
                                                                H_PARTS: str(len(blob.parts))})
            blob.fetched.set()
            if blob.fetches_left is not None:
                blob.fetches_left -= 1
                if blob.fetches_left <= 0:
                    await self._release_blob(subject)

        blob.sub = await self.nc.subscribe(subject, cb=serve)
        self._blobs[subject] = blob
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_blobs())
        return subject

    async def _release_blob(self, subject: str) -> None:
        blob = self._blobs.pop(subject, None)
        if blob is not None and blob.sub is not None:
            try:
                await blob.sub.unsubscribe()
            except Exception:  # connection already closing: the server drops it anyway
                pass

    async def _reap_blobs(self) -> None:
        while self._blobs:
            await asyncio.sleep(min(1.0, self.blob_ttl_s))
            now = time.monotonic()
            for subject in [s for s, b in self._blobs.items() if b.expires <= now]:
                if not self._blobs[subject].fetched.is_set():
                    METRICS.errors.labels(kind="transport_blob_unfetched").inc()
                    _log.warning("nats_blob_expired_unfetched", blob=subject)
                await self._release_blob(subject)

    # -- receiving -------------------------------------------------------------------------

    async def _fetch_blob(self, headers: Mapping[str, str]) -> bytes | None:
        """Pulls a manifest's parts from its sender; None (logged) if it is gone or too slow."""
        total, size = int(headers[H_PARTS]), int(headers[H_SIZE])
        if not 0 < total <= _MAX_PARTS:
            raise ValueError(f"bad part count {total}")
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, pending_bytes_limit=-1)
        try:
            await self.nc.publish(headers[H_BLOB], b"", reply=inbox)
            deadline = time.monotonic() + self.part_timeout_s
            parts: dict[int, bytes] = {}
            while len(parts) < total:
                m = await sub.next_msg(timeout=max(deadline - time.monotonic(), 0.001))
                if m.headers and m.headers.get(_STATUS) == "503":
                    _log.warning("nats_blob_gone", blob=headers[H_BLOB])
                    METRICS.errors.labels(kind="transport_blob_gone").inc()
                    return None
                parts[int((m.headers or {})[H_PART])] = m.data
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            _log.warning("nats_blob_timeout", blob=headers[H_BLOB])
            METRICS.errors.labels(kind="transport_blob_timeout").inc()
            return None
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        data = b"".join(parts[i] for i in range(total))
        if len(data) != size:
            raise ValueError(f"reassembled {len(data)} bytes, manifest said {size}")
        return data

    def _receiver(self, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        """The raw-message callback behind `subscribe`: reassemble, decode, call the handler."""
        reassembler = _Reassembler(self.part_timeout_s, self.reassembly_max_bytes)

        async def on_msg(raw: Msg) -> None:
            headers = dict(raw.headers or {})
            try:
                if H_BLOB in headers:
                    data = await self._fetch_blob(headers)
                elif H_MSG in headers:
                    data = reassembler.add(headers, raw.data)
                else:
                    data = raw.data
                if data is None:
                    return
                check_codec(headers)
                message = decode(data)
            except (ValueError, KeyError) as exc:
                METRICS.errors.labels(kind="transport_decode").inc()
                _log.warning("nats_message_dropped", subject=raw.subject, error=str(exc))
                return
            except Exception as exc:  # fetching parts failed (connection lost, closing, ...)
                METRICS.errors.labels(kind="transport_receive").inc()
                _log.warning("nats_message_lost", subject=raw.subject, error=repr(exc))
                return
            for key in _INTERNAL:
                headers.pop(key, None)
            try:
                await handler(message, headers, raw.reply)
            except Exception:
                METRICS.errors.labels(kind="transport_handler").inc()
                _log.exception("nats_handler_failed", subject=raw.subject, kind=kind_of(message))

        return on_msg

    async def subscribe(self, subject: str, handler: Handler, queue: str = "", *,
                        pending_bytes_limit: int = 1 << 30) -> Subscription:
        """Calls `handler(message, headers, reply)` for every complete message, in arrival order.

        `queue` joins a queue group (each message goes to one member). Split messages are
        reassembled first; malformed ones are dropped and counted (`livestage_errors_total
        {kind="transport_decode"}`); a handler exception is logged and counted, never kills the
        subscription. `pending_bytes_limit` is generous because chunks of frames are large and a
        busy worker must queue them rather than have NATS drop them as a slow consumer.
        Returns the nats-py subscription (`await sub.unsubscribe()` to stop).
        """
        return await self.nc.subscribe(subject, queue=queue, cb=self._receiver(handler),
                                       pending_bytes_limit=pending_bytes_limit)

    # -- request / reply -------------------------------------------------------------------

    async def request(self, subject: str, msg: Envelope, timeout: float = 10.0, *,
                      headers: Mapping[str, str] | None = None) -> Envelope:
        """Request/reply where either direction may be split into parts.

        Raises `NoRespondersError` at once when nobody subscribes to `subject`, and
        `asyncio.TimeoutError` when no (complete) reply arrives within `timeout`.
        """
        inbox = self.nc.new_inbox()
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()

        async def on_reply(message: Envelope, hdrs: dict[str, str], reply: str) -> None:
            if not fut.done():
                fut.set_result(message)

        receive = self._receiver(on_reply)

        async def on_raw(raw: Msg) -> None:
            # The server answers a request to a subject nobody listens on with an empty
            # "Status: 503" message on the inbox.
            if not raw.data and raw.headers and raw.headers.get(_STATUS) == "503":
                if not fut.done():
                    fut.set_exception(NoRespondersError(f"no subscriber on {subject}"))
                return
            await receive(raw)

        sub = await self.nc.subscribe(inbox, cb=on_raw, pending_bytes_limit=1 << 30)
        try:
            await self.publish(subject, msg, reply=inbox, headers=headers, fetches=1)
            return await asyncio.wait_for(fut, timeout)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # connection closed meanwhile
                pass

    async def respond(self, reply: str, msg: Envelope) -> None:
        """Answers a request (no-op when the sender expects no reply)."""
        if reply:
            await self.publish(reply, msg, pull=False)

    # -- lifecycle -------------------------------------------------------------------------

    async def flush(self, timeout: float = 10.0) -> None:
        await self.nc.flush(timeout=int(max(timeout, 1)))

    async def close(self, grace_s: float = 2.0) -> None:
        """Drains the connection: in-flight handlers finish, outgoing messages are flushed, and
        split messages offered for pulling get up to `grace_s` to be fetched first."""
        if self.nc.is_closed:
            return
        pending = [b.fetched.wait() for b in self._blobs.values() if not b.fetched.is_set()]
        if pending:
            try:
                await asyncio.wait_for(asyncio.gather(*pending), grace_s)
            except asyncio.TimeoutError:
                _log.warning("nats_close_with_unfetched_blobs", count=len(pending))
        if self._reaper is not None:
            self._reaper.cancel()
        self._blobs.clear()
        await self.nc.drain()
