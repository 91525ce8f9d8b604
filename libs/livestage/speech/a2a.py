"""Client for an external audio-to-audio system (speech in, speech out) over one WebSocket, for
deployments where one model does listening, thinking and speaking (`dialogue_backend=a2a`).

Protocol (what such a system must speak to plug into LiveStage):

- client -> server, binary: 16-bit little-endian mono PCM at 16 kHz (the user's voice), any size.
- server -> client, binary: 16-bit LE mono PCM (the character's speech) at the rate announced by
  the latest text message carrying `sample_rate` (default 24000 until one does).
- server -> client, text: JSON objects `{"type": ..., "sample_rate": ..., "text": ...}` where
  `type` is
    - `"format"`: only announces `sample_rate` for the binary audio that follows;
    - `"transcript"`: `text` is what the user said;
    - `"reply_text"`: `text` is (a piece of) what the character says;
    - `"end"`: the reply is complete.
  `sample_rate` may ride on any of them. Unknown types and non-JSON text are ignored, so a
  server can add message kinds without breaking older clients.

The server's audio is passed on as it arrives; the caller resamples (`A2AEvent.sample_rate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

__all__ = ["A2AEvent", "AudioToAudioClient"]

_TEXT_KINDS = ("transcript", "reply_text", "end")


@dataclass
class A2AEvent:
    kind: str
    """`audio`, `transcript`, `reply_text` or `end`."""
    audio: np.ndarray | None = None
    """float32 mono in [-1, 1) (on `audio`)."""
    sample_rate: int = 0
    text: str = ""


class AudioToAudioClient:
    """`await connect()`, then `send_audio(pcm16)` and `async for event in client` (or
    `client.events()`); `close()` at the end. Also an async context manager."""

    def __init__(self, url: str, default_rate: int = 24000, heartbeat_s: float = 20.0):
        self.url = url
        self.sample_rate = default_rate
        self.heartbeat_s = heartbeat_s
        self._session = None
        self._ws = None

    async def connect(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        try:
            self._ws = await self._session.ws_connect(self.url, heartbeat=self.heartbeat_s)
        except Exception:
            await self._session.close()
            self._session = None
            raise

    async def send_audio(self, pcm16: bytes) -> None:
        if self._ws is None:
            raise RuntimeError("AudioToAudioClient: connect() first")
        if len(pcm16) % 2:
            raise ValueError(f"pcm16: {len(pcm16)} bytes is not whole 16-bit samples")
        await self._ws.send_bytes(pcm16)

    def __aiter__(self) -> AsyncIterator[A2AEvent]:
        return self.events()

    async def events(self) -> AsyncIterator[A2AEvent]:
        """Events until the server closes the socket."""
        import aiohttp

        if self._ws is None:
            raise RuntimeError("AudioToAudioClient: connect() first")
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                data = msg.data[: len(msg.data) // 2 * 2]
                audio = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
                yield A2AEvent("audio", audio, self.sample_rate)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                event = self._parse(msg.data)
                if event is not None:
                    yield event
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                break

    def _parse(self, data: str) -> A2AEvent | None:
        try:
            message = json.loads(data)
        except ValueError:
            return None
        if not isinstance(message, dict):
            return None
        rate = message.get("sample_rate")
        if isinstance(rate, int) and rate > 0:
            self.sample_rate = rate
        kind = message.get("type", "")
        if kind in _TEXT_KINDS:
            return A2AEvent(kind, None, self.sample_rate, str(message.get("text") or ""))
        return None

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "AudioToAudioClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
