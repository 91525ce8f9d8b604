"""LiveKit's avatar data-stream protocol, avatar side: how a LiveKit Agents voice agent drives a
LiveStage avatar as its audio output.

- The agent sends its speech as `lk.audio_stream` byte streams (attributes `sample_rate`,
  `num_channels`; 16-bit PCM; one stream per utterance, closing it ends the utterance).
- The agent calls the avatar's `lk.clear_buffer` RPC to interrupt (barge-in).
- The avatar calls the agent's `lk.playback_started` and `lk.playback_finished` RPCs, the latter
  with JSON `{"playback_position": seconds, "interrupted": bool}`.
A malformed stream (bad attributes, absurd rate) is refused with a logged reason; it never takes
the publisher down.
"""

from __future__ import annotations

import json
from typing import Awaitable, Callable

import numpy as np

from livestage.observability import get_logger
from livestage.publishing.room import IncomingByteStream, RoomLink

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_PLAYBACK_STARTED = "lk.playback_started"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
MIN_RATE, MAX_RATE = 8000, 48000
EMIT_SECONDS = 0.1

_log = get_logger("avatar_protocol")


class AvatarDataStreamBridge:
    def __init__(self, room: RoomLink, on_audio: Callable[[np.ndarray, int], Awaitable[None]],
                 on_segment_end: Callable[[], Awaitable[None]], on_clear: Callable[[], Awaitable[None]]):
        self.room = room
        self.on_audio = on_audio
        self.on_segment_end = on_segment_end
        self.on_clear = on_clear
        self.agent_identity = ""
        self.rejected: list[str] = []
        room.on_byte_stream(AUDIO_STREAM_TOPIC, self._on_stream)
        room.register_rpc(RPC_CLEAR_BUFFER, self._on_clear_buffer)

    def _reject(self, reason: str) -> None:
        self.rejected.append(reason)
        _log.warning("audio_stream_rejected", reason=reason)

    async def _on_stream(self, stream: IncomingByteStream) -> None:
        self.agent_identity = stream.sender or self.agent_identity
        try:
            rate = int(stream.attributes.get("sample_rate", ""))
            channels = int(stream.attributes.get("num_channels", "1") or 1)
        except ValueError:
            self._reject(f"sample_rate/num_channels attributes are not integers: {stream.attributes}")
            return
        if not MIN_RATE <= rate <= MAX_RATE:
            self._reject(f"sample_rate {rate} outside {MIN_RATE}..{MAX_RATE}")
            return
        if channels not in (1, 2):
            self._reject(f"num_channels {channels} (1 or 2 supported)")
            return
        frame_bytes = 2 * channels
        emit = int(rate * EMIT_SECONDS) * frame_bytes
        pending = b""
        async for chunk in stream.chunks:
            pending += chunk
            while len(pending) >= emit:
                await self._emit(pending[:emit], rate, channels)
                pending = pending[emit:]
        whole = len(pending) // frame_bytes * frame_bytes
        if whole:
            await self._emit(pending[:whole], rate, channels)
        if len(pending) != whole:
            _log.warning("audio_stream_odd_tail", dropped_bytes=len(pending) - whole)
        await self.on_segment_end()

    async def _emit(self, data: bytes, rate: int, channels: int) -> None:
        samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        if channels == 2:
            samples = samples.reshape(-1, 2).mean(axis=1)
        await self.on_audio(samples, rate)

    async def _on_clear_buffer(self, caller: str, payload: str) -> str:
        self.agent_identity = caller or self.agent_identity
        await self.on_clear()
        return "ok"

    async def notify_playback_started(self) -> None:
        if self.agent_identity:
            await self.room.perform_rpc(self.agent_identity, RPC_PLAYBACK_STARTED, "")

    async def notify_playback_finished(self, position_s: float, interrupted: bool) -> None:
        if self.agent_identity:
            await self.room.perform_rpc(self.agent_identity, RPC_PLAYBACK_FINISHED, json.dumps(
                {"playback_position": round(float(position_s), 3), "interrupted": bool(interrupted)}))
