"""The in-process streaming runtime: encoder -> backbone -> refiner -> VAE, one chunk at a time.

One `StreamingAvatar` is one session: it owns the audio windows of the speak and listen streams,
the current text directive (changes apply at the next chunk boundary) and the four stage
sessions. `step()` produces the next 1-second chunk: its frames, the speak audio that plays with
them, and per-stage timings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from livestage.models.audio import StreamingAudioWindow
from livestage.models.bundle import AvatarModels
from livestage.runtime.session_runtime import AudioCursor, AudioDelta, ChunkDelivery, ChunkRequest
from livestage.runtime.session_state import SessionState
from livestage.runtime.stages import (
    ConditionEncoder,
    DecoderSession,
    EncoderSession,
    GeneratorSession,
    ReferenceImages,
    RefinerSession,
)

STAGES = ("encode", "generate", "refine", "decode")


@dataclass
class ChunkResult:
    chunk_index: int
    frames: np.ndarray  # uint8 [frames_per_chunk, H, W, 3]
    speak_audio: np.ndarray  # float32 samples of the speak stream played with these frames
    timings_ms: dict[str, float] = field(default_factory=dict)
    speaking: bool = False

    def timing_record(self) -> dict[str, object]:
        return {"chunk": self.chunk_index, **{f"{k}_ms": round(v, 2) for k, v in self.timings_ms.items()}}


class StreamingAvatar:
    """One avatar session running every stage in this process, one `step()` per chunk (the CLI and
    the model benchmark); the asynchronous runtime uses `InProcessChunkPipeline` directly."""

    def __init__(self, models: AvatarModels, references: ReferenceImages, seed: int = 0,
                 directive: str = ""):
        self.models = models
        self.preset = models.preset
        t0 = time.perf_counter()
        self.pipeline = InProcessChunkPipeline(models, references, seed, lookahead=0)
        self.setup_ms = (time.perf_counter() - t0) * 1000
        self.speak = StreamingAudioWindow.for_chunks(self.preset.chunk)
        self.listen = StreamingAudioWindow.for_chunks(self.preset.chunk)
        self._speak_sent = AudioCursor(self.speak)
        self._listen_sent = AudioCursor(self.listen)
        self.directive = directive
        self._pending_directive: str | None = None
        self.chunk_index = 0

    @property
    def generator(self) -> GeneratorSession:
        return self.pipeline.generator

    @property
    def refiner(self) -> RefinerSession:
        return self.pipeline.refiner

    def push_speak_audio(self, samples: np.ndarray) -> None:
        self.speak.push(samples)

    def push_listen_audio(self, samples: np.ndarray) -> None:
        self.listen.push(samples)

    def set_directive(self, text: str) -> None:
        """Takes effect at the next chunk boundary."""
        self._pending_directive = text

    @torch.no_grad()
    def step(self) -> ChunkResult:
        k = self.chunk_index
        if self._pending_directive is not None:
            self.directive, self._pending_directive = self._pending_directive, None
        delivery = self.pipeline.produce(ChunkRequest("local", k, 0, self._speak_sent.delta(),
                                                      self._listen_sent.delta(), k, self.directive))
        assert delivery is not None
        self.speak.trim_before(k + 1)
        self.listen.trim_before(k + 1)
        self.chunk_index += 1
        return ChunkResult(k, delivery.frames, delivery.speak_audio, delivery.timings_ms,
                           delivery.speaking)


def _lap(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class InProcessChunkPipeline:
    """`ChunkPipeline` running every stage in this process (dev, tests, the in-process baseline).

    Compute runs in a worker thread under a lock, so an interrupt arriving mid-chunk waits for
    that chunk and then rolls the caches back; deliveries of a stale epoch are dropped.
    """

    def __init__(self, models: AvatarModels, references: ReferenceImages, seed: int = 0,
                 lookahead: int = 2):
        self.models = models
        self.encoder = ConditionEncoder(models)
        self.audio = EncoderSession(self.encoder)
        refs = self.encoder.encode_references(references)
        self.generator = GeneratorSession(models, seed, refs, rollback_chunks=lookahead)
        self.refiner = RefinerSession(models, seed, refs, rollback_chunks=lookahead)
        self.decoder = DecoderSession(models, rollback_chunks=lookahead)
        self._epoch = 0
        self._lock = threading.Lock()
        self._deliveries: asyncio.Queue[ChunkDelivery] = asyncio.Queue()

    def _lap(self, start: float) -> float:
        if self.models.device.type == "cuda":  # kernels are asynchronous: time them, not their launch
            torch.cuda.synchronize(self.models.device)
        return _lap(start)

    def produce(self, request: ChunkRequest) -> ChunkDelivery | None:
        with self._lock:
            if request.epoch < self._epoch:
                return None
            timings: dict[str, float] = {}
            t = time.perf_counter()
            self.audio.receive("speak", request.speak.start_sample, request.speak.samples)
            self.audio.receive("listen", request.listen.start_sample, request.listen.samples)
            inputs, speak_audio = self.audio.encode(request.chunk_index, request.directive, request.played_chunk)
            timings["encode"] = self._lap(t)
            t = time.perf_counter()
            coarse = self.generator.generate(inputs)
            timings["generate"] = self._lap(t)
            t = time.perf_counter()
            clean = self.refiner.refine(inputs, coarse)
            timings["refine"] = self._lap(t)
            t = time.perf_counter()
            frames = self.decoder.decode(clean, request.chunk_index)
            timings["decode"] = self._lap(t)
            timings["total"] = sum(timings[s] for s in STAGES)
        return ChunkDelivery(
            session_id=request.session_id, chunk_index=request.chunk_index, epoch=request.epoch,
            frames=frames, speak_audio=np.asarray(speak_audio, dtype=np.float32),
            speaking=inputs.speaking, user_speaking=inputs.user_speaking, timings_ms=timings,
        )

    def restore_audio(self, speak: AudioDelta, listen: AudioDelta) -> None:
        with self._lock:
            self.audio.restore("speak", speak.start_sample, speak.samples)
            self.audio.restore("listen", listen.start_sample, listen.samples)

    async def submit(self, request: ChunkRequest) -> None:
        delivery = await asyncio.to_thread(self.produce, request)
        if delivery is not None and delivery.epoch == self._epoch:
            await self._deliveries.put(delivery)

    async def next_delivery(self) -> ChunkDelivery:
        return await self._deliveries.get()

    async def rollback(self, session_id: str, last_kept_chunk: int, epoch: int) -> None:
        def _rollback() -> None:
            with self._lock:
                self._epoch = epoch
                self.generator.rollback(last_kept_chunk)
                self.refiner.rollback(last_kept_chunk)
                self.decoder.rollback(last_kept_chunk)
        await asyncio.to_thread(_rollback)
        drop_stale(self._deliveries, epoch)

    async def recover(self, last_kept_chunk: int, epoch: int, dead_stages: list[str],
                      history: Callable[[], tuple[AudioDelta, AudioDelta]]) -> None:
        await self.rollback("", last_kept_chunk, epoch)  # nothing dies in-process

    async def play(self, delivery: ChunkDelivery, state: SessionState) -> None:
        return None  # the frames are in the delivery already

    async def close(self) -> None:
        return None


def drop_stale(queue: asyncio.Queue, epoch: int) -> None:
    """Removes queued deliveries of other epochs (generated before an interrupt or failover)."""
    kept = []
    while not queue.empty():
        item = queue.get_nowait()
        if item.epoch == epoch:
            kept.append(item)
    for item in kept:
        queue.put_nowait(item)
