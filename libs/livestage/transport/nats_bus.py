"""`NatsBus`: publish / subscribe / request stage messages over NATS.

Payloads larger than the server's `max_payload` are split into numbered parts (headers
`ls-msg`, `ls-part`, `ls-parts`) and reassembled by the receiving side, so a tensor never fails
to send because of its size (dev runs raise max_payload to 8 MB in nats.conf to keep it rare).
Each message carries the W3C trace context of the sender's span.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from livestage.observability.tracing import inject_headers
from livestage.transport.codec import StageMessage, decode_message, encode_message

Handler = Callable[[StageMessage, dict[str, str], str], Awaitable[None]]
_HEADER_ROOM = 2048  # bytes kept free for headers and protocol overhead


@dataclass
class _Partial:
    parts: dict[int, bytes] = field(default_factory=dict)
    total: int = 0
    started: float = field(default_factory=time.monotonic)


class _Reassembler:
    def __init__(self, ttl_s: float = 30.0):
        self.ttl_s = ttl_s
        self._pending: dict[str, _Partial] = {}

    def add(self, msg: Msg) -> bytes | None:
        headers = msg.headers or {}
        if "ls-msg" not in headers:
            return msg.data
        key = headers["ls-msg"]
        p = self._pending.setdefault(key, _Partial(total=int(headers["ls-parts"])))
        p.parts[int(headers["ls-part"])] = msg.data
        now = time.monotonic()
        for k in [k for k, v in self._pending.items() if now - v.started > self.ttl_s]:
            del self._pending[k]
        if len(p.parts) == p.total:
            del self._pending[key]
            return b"".join(p.parts[i] for i in range(p.total))
        return None


class NatsBus:
    def __init__(self, nc: Client):
        self.nc = nc

    @classmethod
    async def connect(cls, url: str, name: str = "livestage", **kwargs) -> "NatsBus":
        nc = await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                **kwargs)
        return cls(nc)

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def publish(self, subject: str, msg: StageMessage, reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        data = encode_message(msg)
        hdrs = inject_headers(headers)
        limit = max(self.max_payload - _HEADER_ROOM, 1024)
        if len(data) <= limit:
            await self.nc.publish(subject, data, reply=reply, headers=hdrs)
            return
        msg_id = uuid.uuid4().hex
        parts = [data[i:i + limit] for i in range(0, len(data), limit)]
        for i, part in enumerate(parts):
            h = dict(hdrs, **{"ls-msg": msg_id, "ls-part": str(i), "ls-parts": str(len(parts))})
            await self.nc.publish(subject, part, reply=reply, headers=h)

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> object:
        """Calls `handler(message, headers, reply_subject)` for every complete message, in order."""
        reassembler = _Reassembler()

        async def on_msg(raw: Msg) -> None:
            data = reassembler.add(raw)
            if data is None:
                return
            try:
                message = decode_message(data)
            except ValueError:
                return  # malformed: dropped (the sender sees no reply / a timeout)
            await handler(message, dict(raw.headers or {}), raw.reply)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def request(self, subject: str, msg: StageMessage, timeout: float = 10.0) -> StageMessage:
        """Request/reply where both directions may be split into parts."""
        inbox = self.nc.new_inbox()
        fut: asyncio.Future[StageMessage] = asyncio.get_running_loop().create_future()

        async def on_reply(message: StageMessage, headers: dict[str, str], reply: str) -> None:
            if not fut.done():
                fut.set_result(message)

        sub = await self.subscribe(inbox, on_reply)
        try:
            await self.publish(subject, msg, reply=inbox)
            return await asyncio.wait_for(fut, timeout)
        finally:
            await sub.unsubscribe()  # type: ignore[attr-defined]

    async def respond(self, reply: str, msg: StageMessage) -> None:
        if reply:
            await self.publish(reply, msg)

    async def flush(self) -> None:
        await self.nc.flush()

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()
