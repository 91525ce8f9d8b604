"""`DistributedChunkPipeline`: the session runtime's pipeline when every stage is its own service.

It places the session's stateful stages on the freest live workers (recorded in Redis), sends
each chunk request to the encoder queue with the route through its generator, refiner and decoder,
and receives finished chunks on the session's delivery subject. When nothing arrives for
`stage_timeout_s` it checks the placed workers' heartbeats and raises `StageFailure` naming the dead
ones; `recover` then re-places them, rebuilding caches from the checkpointed latents.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from livestage.config import Settings
from livestage.observability import tracer
from livestage.runtime.session_runtime import ChunkDelivery, ChunkRequest, StageFailure
from livestage.state import SessionStore, WorkerRegistry
from livestage.transport import NatsBus, StageMessage, Subjects

STATEFUL_STAGES = ("generator", "refiner", "decoder")


class StageUnavailable(RuntimeError):
    """No live worker of a stage can take the session."""


class DistributedChunkPipeline:
    def __init__(self, session_id: str, bus: NatsBus, store: SessionStore, registry: WorkerRegistry,
                 settings: Settings, seed: int, lookahead: int, samples_per_chunk: int):
        self.session_id = session_id
        self.bus = bus
        self.store = store
        self.registry = registry
        self.settings = settings
        self.seed = seed
        self.lookahead = lookahead
        self.samples_per_chunk = samples_per_chunk
        self.placement: dict[str, str] = {}
        self.epoch = 0
        self._deliveries: asyncio.Queue[StageMessage] = asyncio.Queue()
        self._sub = None
        self._outstanding: dict[int, float] = {}
        self._speak: dict[int, np.ndarray] = {}

    async def open(self) -> dict[str, str]:
        self._sub = await self.bus.subscribe(Subjects.session_deliveries(self.session_id), self._on_delivery)
        for stage in STATEFUL_STAGES:
            await self._place(stage)
        return dict(self.placement)

    async def _on_delivery(self, msg: StageMessage, headers: dict[str, str], reply: str) -> None:
        await self._deliveries.put(msg)

    async def _place(self, stage: str, restore_upto: int | None = None,
                     exclude: tuple[str, ...] = ()) -> str:
        tried = set(exclude)
        while True:
            worker = await self.registry.choose(stage, exclude=tuple(tried))
            if worker is None:
                raise StageUnavailable(f"no live {stage} worker with a free slot")
            meta = {"seed": str(self.seed), "lookahead": str(self.lookahead)}
            if restore_upto is not None:
                meta["restore_upto"] = str(restore_upto)
            try:
                reply = await self.bus.request(
                    Subjects.worker(stage, worker.worker_id),
                    StageMessage("open", self.session_id, epoch=self.epoch, meta=meta),
                    timeout=self.settings.stage_timeout_s)
            except asyncio.TimeoutError:
                reply = StageMessage("error", meta={"error": "timeout"})
            if reply.kind == "opened":
                previous = self.placement.get(stage)
                await self.store.set_placement(self.session_id, stage, worker.worker_id)
                self.placement[stage] = worker.worker_id
                return previous or ""
            tried.add(worker.worker_id)

    async def submit(self, request: ChunkRequest) -> None:
        meta = {f"route.{s}": w for s, w in self.placement.items()}
        meta["directive"] = request.directive
        self._outstanding[request.chunk_index] = time.perf_counter()
        self._speak[request.chunk_index] = np.asarray(request.speak_window[-self.samples_per_chunk:],
                                                      dtype=np.float32)
        with tracer().start_as_current_span("chunk", attributes={
                "livestage.session_id": self.session_id, "livestage.chunk": request.chunk_index}):
            await self.bus.publish(Subjects.stage_work("encoder"), StageMessage(
                "chunk", self.session_id, request.chunk_index, request.epoch, meta,
                {"speak_window": np.asarray(request.speak_window, np.float32),
                 "listen_window": np.asarray(request.listen_window, np.float32)}))

    async def next_delivery(self) -> ChunkDelivery:
        while True:
            try:
                msg = await asyncio.wait_for(self._deliveries.get(), self.settings.stage_timeout_s)
            except asyncio.TimeoutError:
                dead = [s for s, w in self.placement.items() if not await self.registry.is_alive(w)]
                if dead or self._outstanding:
                    raise StageFailure(dead) from None
                continue
            if msg.epoch != self.epoch:
                continue
            k = msg.chunk_index
            submitted = self._outstanding.pop(k, None)
            timings = {key[2:]: float(v) for key, v in msg.meta.items() if key.startswith("t.")}
            if submitted is not None:
                timings["end_to_end"] = (time.perf_counter() - submitted) * 1000
            speak = self._speak.pop(k, np.zeros(self.samples_per_chunk, np.float32))
            for old in [i for i in self._speak if i < k]:
                del self._speak[old]
            return ChunkDelivery(
                session_id=self.session_id, chunk_index=k, epoch=msg.epoch,
                frames=msg.tensors["frames"], speak_audio=speak,
                speaking=msg.meta.get("speaking") == "1",
                user_speaking=msg.meta.get("user_speaking") == "1", timings_ms=timings,
                worker_ids={key[2:]: v for key, v in msg.meta.items() if key.startswith("w.")},
            )

    async def _broadcast(self, kind: str, meta: dict[str, str], stages: tuple[str, ...]) -> None:
        async def one(stage: str) -> None:
            worker = self.placement.get(stage)
            if not worker:
                return
            try:
                await self.bus.request(Subjects.worker(stage, worker),
                                       StageMessage(kind, self.session_id, epoch=self.epoch, meta=meta),
                                       timeout=self.settings.stage_timeout_s)
            except asyncio.TimeoutError:
                pass  # a dead worker is found by the next delivery timeout

        await asyncio.gather(*(one(s) for s in stages))

    def _drop_stale(self) -> None:
        kept = []
        while not self._deliveries.empty():
            m = self._deliveries.get_nowait()
            if m.epoch == self.epoch:
                kept.append(m)
        for m in kept:
            self._deliveries.put_nowait(m)
        self._outstanding.clear()

    async def rollback(self, session_id: str, last_kept_chunk: int, epoch: int) -> None:
        self.epoch = epoch
        await self._broadcast("rollback", {"last_kept": str(last_kept_chunk)}, STATEFUL_STAGES)
        self._drop_stale()

    async def recover(self, last_kept_chunk: int, epoch: int, dead_stages: list[str]) -> None:
        self.epoch = epoch
        alive = tuple(s for s in STATEFUL_STAGES if s not in dead_stages)
        await self._broadcast("rollback", {"last_kept": str(last_kept_chunk)}, alive)
        for stage in dead_stages:
            dead = self.placement.get(stage, "")
            await self._place(stage, restore_upto=last_kept_chunk, exclude=(dead,))
        self._drop_stale()

    async def close(self) -> None:
        await self._broadcast("close", {}, STATEFUL_STAGES)
        if self._sub is not None:
            await self._sub.unsubscribe()
