"""`DistributedChunkPipeline`: the session runtime's pipeline when every stage is its own service.

It places the session on one live worker per stage (`WorkerRegistry.place`, one atomic Redis
script that picks the freest worker, takes its slot and records the placement), sends each chunk
request to the session's encoder with the route through its generator, refiner and decoder, and
receives small `chunk_decoded` notices on the session's delivery subject; when the runtime plays a
chunk it tells the decoder (`play_chunk`), which publishes the frames once. When nothing arrives
for `stage_timeout_s` it checks the placed workers' heartbeats and raises `StageFailure` naming
the dead ones; `recover` re-places them, rebuilding caches from checkpointed latents (DiT stages)
or from the audio the runtime still holds (encoder).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from livestage.config import Settings
from livestage.observability import tracer
from livestage.protos import stages_pb2 as spb
from livestage.runtime.pipeline import drop_stale
from livestage.runtime.session_runtime import AudioDelta, ChunkDelivery, ChunkRequest, StageFailure
from livestage.runtime.session_state import SessionState
from livestage.serving.session.events import STATE_TO_PB
from livestage.serving.stages.wire import audio_slice
from livestage.state import NoWorkerAvailable, WorkerRegistry
from livestage.transport import Envelope, build, NatsBus, Subjects, kind_of, wrap

STAGES = ("encoder", "generator", "refiner", "decoder")


class StageUnavailable(RuntimeError):
    """No live worker of a stage can take the session."""


def _slice(delta: AudioDelta) -> spb.AudioSlice:
    return audio_slice(delta.start_sample, delta.samples)


class DistributedChunkPipeline:
    def __init__(self, session_id: str, bus: NatsBus, registry: WorkerRegistry, settings: Settings,
                 seed: int, lookahead: int):
        self.session_id = session_id
        self.bus = bus
        self.registry = registry
        self.settings = settings
        self.seed = seed
        self.lookahead = lookahead
        self.placement: dict[str, str] = {}
        self.epoch = 0
        self._deliveries: asyncio.Queue[Envelope] = asyncio.Queue()
        self._sub = None
        self._outstanding: dict[int, float] = {}

    async def open(self) -> dict[str, str]:
        self._sub = await self.bus.subscribe(Subjects.session_deliveries(self.session_id), self._on_delivery)
        for stage in STAGES:
            await self._place(stage, spb.OpenStage())
        return dict(self.placement)

    async def _on_delivery(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        if kind_of(env) == "chunk_decoded":
            await self._deliveries.put(env)

    def _route(self) -> spb.Route:
        return build(spb.Route, **self.placement)

    async def _place(self, stage: str, how: spb.OpenStage, exclude: tuple[str, ...] = ()) -> None:
        """Places `stage` on the freest live worker that accepts it (a worker that refuses or does
        not answer is skipped); raises StageUnavailable when none is left."""
        how.seed, how.lookahead = self.seed, self.lookahead
        tried = set(exclude)
        while True:
            try:
                worker = await self.registry.place(self.session_id, stage, exclude=tuple(tried))
            except NoWorkerAvailable:
                raise StageUnavailable(f"no live {stage} worker with a free slot") from None
            try:
                reply = await self.bus.request(Subjects.worker(stage, worker), wrap(how, self.session_id,
                                               epoch=self.epoch), timeout=self.settings.stage_timeout_s)
            except asyncio.TimeoutError:
                reply = None
            if reply is not None and kind_of(reply) == "stage_opened":
                self.placement[stage] = worker
                return
            tried.add(worker)

    async def submit(self, request: ChunkRequest) -> None:
        self._outstanding[request.chunk_index] = time.perf_counter()
        body = build(spb.ChunkRequest, route=self._route(), directive=request.directive, speak=_slice(request.speak),
                                listen=_slice(request.listen), played_chunk=request.played_chunk)
        with tracer().start_as_current_span("chunk", attributes={
                "livestage.session_id": self.session_id, "livestage.chunk": request.chunk_index}):
            await self.bus.publish(Subjects.worker("encoder", self.placement["encoder"]),
                                   wrap(body, self.session_id, request.chunk_index, request.epoch))

    async def next_delivery(self) -> ChunkDelivery:
        while True:
            try:
                env = await asyncio.wait_for(self._deliveries.get(), self.settings.stage_timeout_s)
            except asyncio.TimeoutError:
                dead = [s for s, w in self.placement.items() if not await self.registry.is_alive(w)]
                if dead or self._outstanding:
                    raise StageFailure(dead) from None
                continue
            if env.epoch != self.epoch:
                continue
            k, decoded = env.chunk_index, env.chunk_decoded
            submitted = self._outstanding.pop(k, None)
            timings = {t.stage: t.compute_ms for t in decoded.timings}
            if submitted is not None:
                timings["end_to_end"] = (time.perf_counter() - submitted) * 1000
            return ChunkDelivery(
                session_id=self.session_id, chunk_index=k, epoch=env.epoch, frames=None, speak_audio=None,
                speaking=decoded.speaking, user_speaking=decoded.user_speaking, timings_ms=timings,
                worker_ids={t.stage: t.worker_id for t in decoded.timings},
                frame_shape=tuple(decoded.shape))

    async def play(self, delivery: ChunkDelivery, state: SessionState) -> None:
        decoder = self.placement.get("decoder")
        if decoder:
            await self.bus.publish(Subjects.worker_play("decoder", decoder), wrap(
                spb.PlayChunk(state=STATE_TO_PB[state]), self.session_id, delivery.chunk_index, delivery.epoch))

    async def _broadcast(self, body, stages: tuple[str, ...]) -> None:
        async def one(stage: str) -> None:
            worker = self.placement.get(stage)
            if not worker:
                return
            try:
                await self.bus.request(Subjects.worker(stage, worker), wrap(body, self.session_id, epoch=self.epoch),
                                       timeout=self.settings.stage_timeout_s)
            except asyncio.TimeoutError:
                pass  # a dead worker is found by the next delivery timeout

        await asyncio.gather(*(one(s) for s in stages))

    async def rollback(self, session_id: str, last_kept_chunk: int, epoch: int) -> None:
        self.epoch = epoch
        await self._broadcast(spb.RollbackStage(last_kept=last_kept_chunk), STAGES)
        drop_stale(self._deliveries, self.epoch)
        self._outstanding.clear()

    async def recover(self, last_kept_chunk: int, epoch: int, dead_stages: list[str],
                      history: Callable[[], tuple[AudioDelta, AudioDelta]]) -> None:
        self.epoch = epoch
        alive = tuple(s for s in STAGES if s not in dead_stages)
        await self._broadcast(spb.RollbackStage(last_kept=last_kept_chunk), alive)
        for stage in dead_stages:
            how = spb.OpenStage(restore=True, restore_upto=last_kept_chunk)
            if stage == "encoder":
                speak, listen = history()
                how.speak_history.CopyFrom(_slice(speak))
                how.listen_history.CopyFrom(_slice(listen))
            await self._place(stage, how, exclude=(self.placement.get(stage, ""),))
        drop_stale(self._deliveries, self.epoch)
        self._outstanding.clear()

    async def close(self) -> None:
        await self._broadcast(spb.CloseStage(), STAGES)
        if self._sub is not None:
            await self._sub.unsubscribe()
