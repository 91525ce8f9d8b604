"""Stage workers: the encoder (stateless, queue group) and the sticky generator, refiner and
decoder, each wrapping its `livestage.runtime.stages` session class behind NATS subjects.

Message kinds on a worker's subject (`Subjects.worker(stage, worker_id)`):
- `open` (request/reply): start holding a session; with `restore_upto`, rebuild its caches from
  the checkpointed latents up to that chunk (failover).
- `chunk`: one chunk's conditions (+ latents from the previous stage); the result goes to the
  next stage's worker named in the message's route, or back to the session as a delivery.
- `rollback`: forget history newer than a chunk and ignore older epochs (interrupts, failover).
- `close`: drop the session.
Compute runs in a thread so heartbeats keep flowing; one subscription keeps messages in order.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from livestage.config import Settings
from livestage.models.bundle import AvatarModels, build_models
from livestage.observability import METRICS, bind_session, extract_context, tracer
from livestage.runtime.stages import (
    ConditionEncoder,
    DecoderSession,
    GeneratorSession,
    HistoryEntry,
    RefinerSession,
)
from livestage.serving import wire
from livestage.serving.process import ServiceProcess
from livestage.state import CheckpointStore, SessionNotFound, SessionStore, WorkerInfo, WorkerRegistry
from livestage.transport import StageMessage, Subjects

NEXT_STAGE = {"encoder": "generator", "generator": "refiner", "refiner": "decoder"}


def load_models(settings: Settings) -> AvatarModels:
    return build_models(settings.preset, settings.weights_dir or None, seed=settings.seed,
                        allow_seeded=settings.allow_seeded_weights)


class StageWorker:
    stage = "stage"

    def __init__(self, proc: ServiceProcess, models: AvatarModels):
        self.proc = proc
        self.settings = proc.settings
        self.models = models
        self.log = proc.log

    @property
    def bus(self):
        return self.proc.bus

    async def forward(self, msg: StageMessage, tensors: dict[str, np.ndarray], stage_ms: float) -> None:
        """Sends the result to the next stage's worker, or to the session if this is the last."""
        meta = dict(msg.meta)
        meta[f"t.{self.stage}"] = f"{stage_ms:.3f}"
        meta[f"w.{self.stage}"] = self.proc.worker_id
        nxt = NEXT_STAGE.get(self.stage)
        if nxt is None:
            out = StageMessage("delivery", msg.session_id, msg.chunk_index, msg.epoch, meta, tensors)
            await self.bus.publish(Subjects.session_deliveries(msg.session_id), out)
            return
        worker = meta.get(f"route.{nxt}", "")
        if not worker:
            self.log.warning("no_route", next_stage=nxt, session_id=msg.session_id)
            return
        await self.bus.publish(Subjects.worker(nxt, worker),
                               StageMessage("chunk", msg.session_id, msg.chunk_index, msg.epoch, meta, tensors))


class EncoderWorker(StageWorker):
    """Stateless: reference images -> latents (request/reply), audio/text -> chunk conditions."""

    stage = "encoder"

    def __init__(self, proc: ServiceProcess, models: AvatarModels):
        super().__init__(proc, models)
        self.encoder = ConditionEncoder(models)

    async def start(self) -> None:
        await self.bus.subscribe(Subjects.stage_work("encoder"), self.handle, queue="encoder")

    async def handle(self, msg: StageMessage, headers: dict[str, str], reply: str) -> None:
        with tracer().start_as_current_span(f"encoder.{msg.kind}", context=extract_context(headers)):
            await self._handle(msg, reply)

    async def _handle(self, msg: StageMessage, reply: str) -> None:
        try:
            if msg.kind == "references":
                await self._references(msg, reply)
            elif msg.kind == "chunk":
                await self._chunk(msg)
        except Exception as exc:  # one bad message must not kill the worker
            METRICS.errors.labels(kind="encoder").inc()
            self.log.exception("encoder_error", session_id=msg.session_id)
            await self.bus.respond(reply, StageMessage("error", msg.session_id, meta={"error": str(exc)}))

    async def _references(self, msg: StageMessage, reply: str) -> None:
        kinds = [k for k in msg.meta.get("kinds", "").split(",") if k]
        images = [(kind, torch.from_numpy(np.array(msg.tensors[f"image{i}"], copy=True)))
                  for i, kind in enumerate(kinds)]
        latents = await asyncio.to_thread(self.encoder.encode_references, images)
        data = wire.encode_references(latents)
        await self.bus.respond(reply, StageMessage(
            "references", msg.session_id, meta={"weights": ",".join(
                f"{k}={v}" for k, v in self.models.describe().items()), "seeded": str(int(self.models.seeded))},
            tensors={"encoded": np.frombuffer(data, dtype=np.uint8)}))

    async def _chunk(self, msg: StageMessage) -> None:
        t0 = time.perf_counter()
        with bind_session(msg.session_id, msg.chunk_index):
            inputs = await asyncio.to_thread(
                self.encoder.encode_chunk, msg.chunk_index, msg.tensors["speak_window"],
                msg.tensors["listen_window"], msg.meta.get("directive", ""))
        tensors, meta = wire.inputs_to_tensors(inputs)
        msg.meta.update(meta)
        ms = (time.perf_counter() - t0) * 1000
        METRICS.stage_latency.labels(stage="encode").observe(ms / 1000)
        await self.forward(msg, tensors, ms)


class StatefulStageWorker(StageWorker):
    """Sticky sessions with capacity, heartbeats, epochs, checkpoints and restore."""

    checkpoint_stage: str | None = None  # stage whose checkpoints this one saves/restores from

    def __init__(self, proc: ServiceProcess, models: AvatarModels):
        super().__init__(proc, models)
        self.sessions: dict[str, object] = {}
        self.epochs: dict[str, int] = {}
        self.pending: dict[str, dict[int, StageMessage]] = {}
        self.store = SessionStore(proc.redis, proc.settings.session_ttl_s)
        self.ckpt = CheckpointStore(proc.redis, proc.settings.session_ttl_s)
        self.registry = WorkerRegistry(proc.redis, proc.settings.heartbeat_ttl_s)
        self._hb_task: asyncio.Task | None = None

    @property
    def free(self) -> int:
        return max(self.settings.capacity - len(self.sessions), 0)

    async def start(self) -> None:
        await self.bus.subscribe(Subjects.worker(self.stage, self.proc.worker_id), self.handle)
        await self.heartbeat()
        self._hb_task = asyncio.create_task(self._heartbeat_loop())

    async def heartbeat(self) -> None:
        await self.registry.heartbeat(WorkerInfo(
            self.proc.worker_id, self.stage, self.settings.capacity, self.free,
            Subjects.worker(self.stage, self.proc.worker_id)))
        METRICS.sessions_per_worker.labels(stage=self.stage, worker_id=self.proc.worker_id).set(len(self.sessions))

    async def _heartbeat_loop(self) -> None:
        while not self.proc.stopping.is_set():
            try:
                await self.heartbeat()
            except Exception:
                self.log.warning("heartbeat_failed")
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def drain(self) -> None:
        """On SIGTERM: stop advertising, let in-flight chunks finish, release sessions."""
        if self._hb_task:
            self._hb_task.cancel()
        await self.registry.deregister(self.proc.worker_id, self.stage)
        await asyncio.sleep(0.2)

    async def handle(self, msg: StageMessage, headers: dict[str, str], reply: str) -> None:
        # One span per message, child of the sender's: a chunk is one trace across all stages.
        with tracer().start_as_current_span(f"{self.stage}.{msg.kind}", context=extract_context(headers)):
            await self._handle(msg, reply)

    async def _handle(self, msg: StageMessage, reply: str) -> None:
        try:
            with bind_session(msg.session_id, msg.chunk_index if msg.chunk_index >= 0 else None):
                if msg.kind == "open":
                    await self._open(msg, reply)
                elif msg.kind == "chunk":
                    await self._chunk(msg)
                elif msg.kind == "rollback":
                    await self._rollback(msg, reply)
                elif msg.kind == "close":
                    self.sessions.pop(msg.session_id, None)
                    self.epochs.pop(msg.session_id, None)
                    await self.bus.respond(reply, StageMessage("closed", msg.session_id))
                    await self.heartbeat()
        except Exception as exc:
            METRICS.errors.labels(kind=self.stage).inc()
            self.log.exception("stage_error", kind=msg.kind)
            await self.bus.respond(reply, StageMessage("error", msg.session_id, meta={"error": str(exc)}))

    async def _open(self, msg: StageMessage, reply: str) -> None:
        sid = msg.session_id
        if sid not in self.sessions and self.free <= 0:
            await self.bus.respond(reply, StageMessage("error", sid, meta={"error": "worker full"}))
            return
        refs = wire.decode_references(await self.store.load_references(sid), self.models.device,
                                      self.models.dtype)
        seed = int(msg.meta.get("seed", "0"))
        lookahead = int(msg.meta.get("lookahead", str(self.settings.lookahead_chunks)))
        session = await asyncio.to_thread(self.new_session, refs, seed, lookahead)
        restore_upto = msg.meta.get("restore_upto")
        if restore_upto is not None:
            entries = await self.load_entries(sid, int(restore_upto))
            await asyncio.to_thread(self.restore, session, entries)
            self.log.info("session_restored", entries=[e.chunk_index for e in entries])
        self.sessions[sid] = session
        self.epochs[sid] = msg.epoch
        await self.heartbeat()
        await self.bus.respond(reply, StageMessage("opened", sid, meta={"worker": self.proc.worker_id}))

    async def load_entries(self, session_id: str, upto: int) -> list[HistoryEntry]:
        """Sinks and the last window chunks with index <= upto, from the checkpoint store."""
        stage = self.checkpoint_stage or self.stage
        stored = await self.ckpt.load(session_id, stage)
        entries = [wire.decode_entry(b, self.models.device, self.models.dtype)
                   for k, b in sorted(stored.items()) if k <= upto]
        chunk = self.models.preset.chunk
        sinks = entries[:chunk.sink_chunks]
        window = entries[chunk.sink_chunks:][-chunk.window_chunks:] if chunk.window_chunks else []
        return sinks + window

    async def _rollback(self, msg: StageMessage, reply: str) -> None:
        sid = msg.session_id
        self.pending.pop(sid, None)
        if sid in self.sessions:
            self.epochs[sid] = msg.epoch
            await asyncio.to_thread(self.sessions[sid].rollback, int(msg.meta["last_kept"]))  # type: ignore[attr-defined]
        await self.bus.respond(reply, StageMessage("rolled_back", sid))

    def expected_index(self, session) -> int:
        return session.next_chunk_index

    async def _chunk(self, msg: StageMessage) -> None:
        """Processes chunks of a session strictly in index order (several encoders may reorder)."""
        sid = msg.session_id
        session = self.sessions.get(sid)
        if session is None:
            self.log.warning("chunk_for_unknown_session")
            return
        if msg.epoch < self.epochs.get(sid, 0):
            return  # generated before an interrupt or failover: drop
        pending = self.pending.setdefault(sid, {})
        pending[msg.chunk_index] = msg
        while True:
            expected = self.expected_index(session)
            for stale in [k for k in pending if k < expected]:
                del pending[stale]
            nxt = pending.pop(expected, None)
            if nxt is None:
                return
            if nxt.epoch < self.epochs.get(sid, 0):
                continue
            await self._process_one(sid, session, nxt)

    async def _process_one(self, sid: str, session, msg: StageMessage) -> None:
        t0 = time.perf_counter()
        tensors = await asyncio.to_thread(self.process, session, msg)
        ms = (time.perf_counter() - t0) * 1000
        METRICS.stage_latency.labels(stage=self.stage).observe(ms / 1000)
        METRICS.chunks.labels(stage=self.stage).inc()
        await self.after_chunk(sid, session, msg)
        await self.forward(msg, tensors, ms)

    # -- per stage ------------------------------------------------------------------------------
    def new_session(self, refs, seed: int, lookahead: int):
        raise NotImplementedError

    def restore(self, session, entries: list[HistoryEntry]) -> None:
        session.restore(entries)

    def process(self, session, msg: StageMessage) -> dict[str, np.ndarray]:
        raise NotImplementedError

    async def after_chunk(self, session_id: str, session, msg: StageMessage) -> None:
        """Checkpoints this chunk's history entry (sinks + window + rollback reserve kept)."""
        entry = session.entry(msg.chunk_index)
        if entry is None:
            return
        keep = [c.chunk_index for c in session.cache.retained()]
        await self.ckpt.save(session_id, self.stage, msg.chunk_index, wire.encode_entry(entry), keep)


class GeneratorWorker(StatefulStageWorker):
    stage = "generator"

    def new_session(self, refs, seed: int, lookahead: int) -> GeneratorSession:
        return GeneratorSession(self.models, seed, refs, rollback_chunks=lookahead)

    def process(self, session: GeneratorSession, msg: StageMessage) -> dict[str, np.ndarray]:
        inputs = wire.inputs_from_message(msg, self.models.device, self.models.dtype)
        coarse = session.generate(inputs)
        tensors, _ = wire.inputs_to_tensors(inputs)
        tensors["coarse"] = wire.to_np(coarse)
        return tensors

    async def after_chunk(self, session_id: str, session: GeneratorSession, msg: StageMessage) -> None:
        await super().after_chunk(session_id, session, msg)
        sinks = session.cache.sinks
        try:
            await self.store.update(
                session_id,
                sink_digest=wire.sink_digest(session.history_entries(),
                                             self.models.preset.chunk.sink_chunks),
                sink_chunks=",".join(str(c.chunk_index) for c in sinks),
                chunks_generated=msg.chunk_index + 1)
        except SessionNotFound:
            pass


class RefinerWorker(StatefulStageWorker):
    stage = "refiner"

    def new_session(self, refs, seed: int, lookahead: int) -> RefinerSession:
        return RefinerSession(self.models, seed, refs, rollback_chunks=lookahead)

    def process(self, session: RefinerSession, msg: StageMessage) -> dict[str, np.ndarray]:
        inputs = wire.inputs_from_message(msg, self.models.device, self.models.dtype)
        coarse = wire.to_torch(msg.tensors["coarse"], self.models.device, self.models.dtype)
        clean = session.refine(inputs, coarse)
        return {"clean": wire.to_np(clean)}


class DecoderWorker(StatefulStageWorker):
    stage = "decoder"
    checkpoint_stage = "refiner"  # clean latents of the refiner's history warm a new decoder

    def new_session(self, refs, seed: int, lookahead: int) -> DecoderSession:
        return DecoderSession(self.models, rollback_chunks=lookahead)

    def expected_index(self, session: DecoderSession) -> int:
        return session.last_chunk_index + 1

    def restore(self, session: DecoderSession, entries: list[HistoryEntry]) -> None:
        """Warms the conv cache by decoding the last kept chunk's clean latents (frames dropped)."""
        if entries:
            last = entries[-1]
            session.decode(last.latent, last.chunk_index)

    def process(self, session: DecoderSession, msg: StageMessage) -> dict[str, np.ndarray]:
        clean = wire.to_torch(msg.tensors["clean"], self.models.device, self.models.dtype)
        return {"frames": session.decode(clean, msg.chunk_index)}

    async def after_chunk(self, session_id: str, session, msg: StageMessage) -> None:
        return None


WORKERS = {"encoder": EncoderWorker, "generator": GeneratorWorker, "refiner": RefinerWorker,
           "decoder": DecoderWorker}


def run_stage(stage: str) -> None:
    """Entry point of `python -m services.<stage>`."""
    from livestage.config import load_settings

    settings = load_settings(Settings, service=stage)

    async def main() -> None:
        proc = ServiceProcess(settings, stage)
        models = await asyncio.to_thread(load_models, settings)
        proc.log.info("models_loaded", preset=settings.preset, weights=models.describe())
        holder: dict[str, StageWorker] = {}

        async def setup() -> None:  # runs once NATS and Redis are connected
            holder["w"] = WORKERS[stage](proc, models)
            await holder["w"].start()

        async def drain() -> None:
            worker = holder.get("w")
            if isinstance(worker, StatefulStageWorker):
                await worker.drain()

        await proc.run(setup, drain)

    asyncio.run(main())
