"""The persistent per-session runtime: chunk clock, controlled lookahead, interrupts, states.

The runtime owns what belongs to the session rather than to a model: the speak and listen audio
windows, the text directive (applied at the next chunk boundary), the state machine and the
playback clock. It asks a `ChunkPipeline` to produce chunks and keeps generation at most
`lookahead` chunks ahead of playback, so an interrupt is visible within about one chunk:

- on `interrupt()`, speak audio beyond the chunk now playing is dropped, the pipeline rolls its
  caches back to that chunk, and every chunk generated beyond it is discarded (its *epoch* is
  stale) and generated again without the interrupted speech.

The pipeline is an interface: `InProcessChunkPipeline` runs the stages in this process; the
session service plugs in a distributed one that sends the same requests over NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import numpy as np

from livestage.models.audio import StreamingAudioWindow
from livestage.models.config import ChunkConfig
from livestage.runtime.session_state import SessionState, SessionStateMachine, Transition


@dataclass(frozen=True)
class AudioDelta:
    """New samples of one stream since the previous request, placed on the session timeline:
    the receiver forgets what it held from `start_sample` on and appends `samples` (so a cut made
    by an interrupt reaches it as a delta that starts at the cut)."""

    start_sample: int
    samples: np.ndarray  # float32 mono


class AudioCursor:
    """Tracks how far a stream has been sent, so every sample is sent once."""

    def __init__(self, window: StreamingAudioWindow):
        self.window = window
        self.sent_end = 0

    def delta(self) -> AudioDelta:
        start = max(min(self.sent_end, self.window.end_sample), self.window.origin)
        self.sent_end = self.window.end_sample
        return AudioDelta(start, self.window.samples_from(start))

    def history(self) -> AudioDelta:
        """Everything the window still holds (to rebuild a receiver from scratch)."""
        self.sent_end = self.window.end_sample
        return AudioDelta(self.window.origin, self.window.samples_from(self.window.origin))


@dataclass
class ChunkRequest:
    """Everything the pipeline needs to produce chunk `chunk_index` of a session: the audio that
    arrived since the previous request (the pipeline's encoder keeps the 3-s windows)."""

    session_id: str
    chunk_index: int
    epoch: int
    speak: AudioDelta
    listen: AudioDelta
    played_chunk: int = 0  # audio before this chunk's window is no longer needed
    directive: str = ""
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class ChunkDelivery:
    """A finished chunk: its flags, frame shape and stage timings. In-process pipelines include
    the frames (uint8 [T, H, W, 3]) and speak audio; the distributed pipeline's decoder keeps them
    and publishes them once when the chunk plays (`ChunkPipeline.play`)."""

    session_id: str
    chunk_index: int
    epoch: int
    frames: np.ndarray | None
    speak_audio: np.ndarray | None
    speaking: bool
    user_speaking: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    worker_ids: dict[str, str] = field(default_factory=dict)
    frame_shape: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.frames.shape) if self.frames is not None else self.frame_shape


class StageFailure(Exception):
    """The pipeline stopped delivering: `dead_stages` lists stages whose worker is gone."""

    def __init__(self, dead_stages: list[str]):
        super().__init__(f"stages not delivering: {', '.join(dead_stages) or 'unknown'}")
        self.dead_stages = dead_stages


class ChunkPipeline(Protocol):
    async def submit(self, request: ChunkRequest) -> None: ...

    async def next_delivery(self) -> ChunkDelivery: ...

    async def rollback(self, session_id: str, last_kept_chunk: int, epoch: int) -> None: ...

    async def recover(self, last_kept_chunk: int, epoch: int, dead_stages: list[str],
                      history: Callable[[], tuple[AudioDelta, AudioDelta]]) -> None:
        """Re-places dead stages; `history()` (call it only to rebuild an encoder) hands over the
        audio the runtime holds and counts it as sent."""

    async def play(self, delivery: ChunkDelivery, state: SessionState) -> None:
        """Chunk `delivery` starts playing now (in `state`): show its frames."""

    async def close(self) -> None: ...


EventSink = Callable[[str, dict], Awaitable[None]]


async def _no_events(kind: str, payload: dict) -> None:
    return None


class SessionRuntime:
    """Drives one session's chunks through a pipeline at the chunk clock."""

    def __init__(self, session_id: str, chunk: ChunkConfig, pipeline: ChunkPipeline,
                 lookahead: int = 2, realtime: bool = True, events: EventSink = _no_events,
                 on_chunk: Callable[[ChunkDelivery], Awaitable[None]] | None = None):
        if lookahead < 1:
            raise ValueError("lookahead must be at least 1 chunk")
        self.session_id = session_id
        self.chunk = chunk
        self.pipeline = pipeline
        self.lookahead = lookahead
        self.realtime = realtime
        self.events = events
        self.on_chunk = on_chunk
        self.speak = StreamingAudioWindow.for_chunks(chunk)
        self.listen = StreamingAudioWindow.for_chunks(chunk)
        self._speak_sent = AudioCursor(self.speak)
        self._listen_sent = AudioCursor(self.listen)
        self.directive = ""
        self._pending_directive: str | None = None
        self.state = SessionStateMachine()
        self.epoch = 0
        self.next_submit = 0
        self.played = 0  # chunks whose playback has started
        self.delivered: list[int] = []
        self._clock_start: float | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.first_chunk_latency_s: float | None = None
        self._started_at = time.perf_counter()
        self._reported_played = -1
        self._reported_at: float | None = None
        self.playback_report_ttl_s = 10.0
        self._pending_delivery: asyncio.Future | None = None

    # -- inputs (take effect at chunk boundaries) ---------------------------------------------
    def push_speak_audio(self, samples: np.ndarray) -> None:
        """Speech of the character. When the speak stream has gone quiet, new speech starts at the
        first chunk not yet submitted (the earliest it can still be shown), not back at the end of
        the previous reply."""
        self.speak.pad_to(self.next_submit * self.chunk.chunk_seconds)
        self.speak.push(samples)

    def push_listen_audio(self, samples: np.ndarray) -> None:
        """The user's voice, placed at the chunk now playing when the stream had gone quiet."""
        self.listen.pad_to(self.played * self.chunk.chunk_seconds)
        self.listen.push(samples)

    def report_playback(self, chunk_index: int) -> None:
        """The publisher has started playing `chunk_index`. Generation stays at most `lookahead`
        chunks ahead of what the publisher really plays (its own queue included), not only of the
        runtime's chunk clock; a report older than `playback_report_ttl_s` is ignored so a dead
        publisher cannot stall the session."""
        self._reported_played = max(self._reported_played, chunk_index)
        self._reported_at = time.monotonic()
        self._wake.set()

    @property
    def speech_pending(self) -> bool:
        """Speech received that has not finished playing (a user talking now is barging in)."""
        return self.speak.end_sample > self.played * self.chunk.samples_per_chunk

    def _playback_base(self) -> int:
        if self._reported_at is None or time.monotonic() - self._reported_at > self.playback_report_ttl_s:
            return self.played
        return min(self.played, self._reported_played + 1 + self.lookahead)

    def set_directive(self, text: str) -> None:
        self._pending_directive = text

    async def interrupt(self) -> int:
        """Drops speech beyond the chunk now playing (a responding character listens again);
        returns the last chunk kept."""
        last_kept = self.played - 1
        self.speak.drop_after(max(last_kept + 1, 0) * self.chunk.chunk_seconds)
        self.epoch += 1
        await self.pipeline.rollback(self.session_id, last_kept, self.epoch)
        self.next_submit = last_kept + 1
        await self.events("interrupted", {"last_kept_chunk": last_kept, "epoch": self.epoch})
        await self._emit_transition(self.state.on_interrupt(last_kept))
        self._wake.set()
        return last_kept

    async def _recover(self, failure: StageFailure) -> None:
        """Failover: re-place dead stages, rebuild their caches from the checkpointed latents up
        to the last chunk played, and regenerate what was in flight (same chunk indices)."""
        last_kept = self.played - 1
        self.epoch += 1
        await self.events("failover", {"dead_stages": failure.dead_stages, "last_kept_chunk": last_kept})
        await self.pipeline.recover(last_kept, self.epoch, failure.dead_stages, self._audio_history)
        self.next_submit = last_kept + 1

    def _audio_history(self) -> tuple[AudioDelta, AudioDelta]:
        return self._speak_sent.history(), self._listen_sent.history()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def end_unstarted(self) -> None:
        """Ends a session whose loop never ran (the end transition `run` would have emitted)."""
        await self._emit_transition(self.state.end(self.played))

    # -- the loop -------------------------------------------------------------------------------
    async def _fill_lookahead(self) -> None:
        while self.next_submit < self._playback_base() + self.lookahead:
            k = self.next_submit
            if self._pending_directive is not None:
                self.directive, self._pending_directive = self._pending_directive, None
            await self.pipeline.submit(ChunkRequest(
                session_id=self.session_id, chunk_index=k, epoch=self.epoch,
                speak=self._speak_sent.delta(), listen=self._listen_sent.delta(),
                played_chunk=self.played, directive=self.directive,
            ))
            self.next_submit += 1

    async def _emit_transition(self, tr: Transition | None) -> None:
        if tr is not None:
            await self.events("state", {"from": tr.previous.value, "to": tr.current.value,
                                        "chunk": tr.chunk_index})

    async def _wait_for_slot(self, chunk_index: int) -> None:
        """Real-time pacing: chunk k starts playing chunk_seconds after chunk k-1."""
        if not self.realtime:
            return
        now = time.perf_counter()
        if self._clock_start is None:
            self._clock_start = now - chunk_index * self.chunk.chunk_seconds
        due = self._clock_start + chunk_index * self.chunk.chunk_seconds
        if due > now:
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=due - now)
            except asyncio.TimeoutError:
                pass
        elif now - due > self.chunk.chunk_seconds:
            self._clock_start = now - chunk_index * self.chunk.chunk_seconds  # fell behind: re-anchor

    async def _next_delivery_or_stop(self) -> ChunkDelivery | None:
        """The next delivery; None when `stop()` is called or something woke the loop (an
        interrupt that needs new requests, a playback report that opens lookahead slots).

        The wait for the pipeline is never cancelled on a wake-up: it stays pending and the next
        call picks it up. Cancelling it could lose a delivery it had already taken (a pipeline's
        `next_delivery` that wraps its queue in `asyncio.wait_for` returns the item instead of
        raising when cancelled just as the item arrives), and the session would then wait forever
        for a chunk that was generated and dropped."""
        self._wake.clear()
        if self._pending_delivery is None:
            self._pending_delivery = asyncio.ensure_future(self.pipeline.next_delivery())
        delivery = self._pending_delivery
        stopped = asyncio.ensure_future(self._stop.wait())
        woken = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait({delivery, stopped, woken}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        woken.cancel()
        if delivery.done():
            self._pending_delivery = None
            return delivery.result()
        return None

    async def _drop_pending_delivery(self) -> None:
        if self._pending_delivery is not None:
            self._pending_delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pending_delivery
            self._pending_delivery = None

    async def run(self, max_chunks: int | None = None) -> None:
        """Produces chunks until `stop()` (or `max_chunks` delivered)."""
        try:
            while not self._stop.is_set():
                if max_chunks is not None and self.played >= max_chunks:
                    break
                await self._fill_lookahead()
                try:
                    delivery = await self._next_delivery_or_stop()
                except StageFailure as failure:
                    await self._recover(failure)
                    continue
                if delivery is None:
                    continue  # stopped (the loop condition ends it) or woken to refill after an interrupt
                if delivery.epoch != self.epoch or delivery.chunk_index != self.played:
                    continue  # generated before an interrupt (or a duplicate): never shown
                await self._wait_for_slot(delivery.chunk_index)
                if delivery.epoch != self.epoch:
                    continue  # interrupted while waiting for its slot
                if self.first_chunk_latency_s is None:
                    self.first_chunk_latency_s = time.perf_counter() - self._started_at
                self.played = delivery.chunk_index + 1
                self.delivered.append(delivery.chunk_index)
                await self._emit_transition(
                    self.state.on_chunk(delivery.chunk_index, delivery.speaking, delivery.user_speaking))
                await self.pipeline.play(delivery, self.state.state)
                if self.on_chunk is not None:
                    await self.on_chunk(delivery)
                shape = list(delivery.shape)
                await self.events("chunk", {"chunk": delivery.chunk_index,
                                            "frames": int(shape[0]) if shape else 0,
                                            "shape": shape, "timings_ms": delivery.timings_ms})
                self.speak.trim_before(self.played)
                self.listen.trim_before(self.played)
        finally:
            await self._drop_pending_delivery()
        await self._emit_transition(self.state.end(self.played))

    @property
    def current_state(self) -> SessionState:
        return self.state.state
