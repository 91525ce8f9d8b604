"""Stage workers: the NATS side of the encoder (stateless, queue group) and of the sticky generator,
refiner and decoder. The compute lives in a stage engine (`livestage.serving.engines`) reached
through a backend: in this process (`LIVESTAGE_BACKEND=local`) or on a Triton server
(`LIVESTAGE_BACKEND=triton`, `LIVESTAGE_TRITON_URL`). The worker owns what is about the service:
subjects, ordering, epochs, capacity and heartbeats, checkpoints in Redis, forwarding.

Message kinds on a worker's subject (`Subjects.worker(stage, worker_id)`):
- `open` (request/reply): start holding a session; with `restore_upto`, rebuild its caches from
  the checkpointed latents up to that chunk (failover).
- `chunk`: one chunk's conditions (+ latents from the previous stage); the result goes to the
  next stage's worker named in the message's route, or back to the session as a delivery.
- `rollback`: forget history newer than a chunk and ignore older epochs (interrupts, failover).
- `close`: drop the session.
Backend calls run in a thread so heartbeats keep flowing; one subscription keeps messages in order.
"""

from __future__ import annotations

import asyncio

import numpy as np

from livestage.config import Settings
from livestage.models.bundle import build_models
from livestage.observability import METRICS, bind_session, extract_context, tracer
from livestage.serving.backends import LocalBackend, StageBackend, TritonBackend
from livestage.serving.engines import CHECKPOINT_SOURCE, make_engine
from livestage.serving.process import ServiceProcess
from livestage.state import CheckpointStore, SessionNotFound, SessionStore, WorkerInfo, WorkerRegistry
from livestage.transport import StageMessage, Subjects

NEXT_STAGE = {"encoder": "generator", "generator": "refiner", "refiner": "decoder"}


class BackendError(RuntimeError):
    """The engine answered `error` (the message says why)."""


def make_backend(settings: Settings, stage: str) -> StageBackend:
    if settings.backend == "triton":
        if not settings.triton_url:
            raise ValueError("LIVESTAGE_TRITON_URL is required with LIVESTAGE_BACKEND=triton")
        return TritonBackend(settings.triton_url, stage, stateful=stage != "encoder")
    if settings.backend != "local":
        raise ValueError(f"LIVESTAGE_BACKEND must be local or triton, got {settings.backend!r}")
    models = build_models(settings.preset, settings.weights_dir or None, seed=settings.seed,
                          allow_seeded=settings.allow_seeded_weights, compile=settings.compile)
    return LocalBackend(make_engine(stage, models, settings.session_idle_timeout_s))


class StageWorker:
    stage = "stage"

    def __init__(self, proc: ServiceProcess, backend: StageBackend):
        self.proc = proc
        self.settings = proc.settings
        self.backend = backend
        self.log = proc.log

    @property
    def bus(self):
        return self.proc.bus

    async def call(self, msg: StageMessage) -> StageMessage:
        reply = await asyncio.to_thread(self.backend.call, msg)
        if reply.kind == "error":
            raise BackendError(reply.meta.get("error", "engine error"))
        return reply

    async def handle(self, msg: StageMessage, headers: dict[str, str], reply: str) -> None:
        # One span per message, child of the sender's: a chunk is one trace across all stages.
        with tracer().start_as_current_span(f"{self.stage}.{msg.kind}", context=extract_context(headers)):
            with bind_session(msg.session_id, msg.chunk_index if msg.chunk_index >= 0 else None):
                try:
                    await self.dispatch(msg, reply)
                except Exception as exc:  # one bad message must not kill the worker
                    METRICS.errors.labels(kind=self.stage).inc()
                    self.log.exception("stage_error", kind=msg.kind)
                    await self.bus.respond(reply, StageMessage("error", msg.session_id, meta={"error": str(exc)}))

    async def dispatch(self, msg: StageMessage, reply: str) -> None:
        raise NotImplementedError

    async def forward(self, msg: StageMessage, result: StageMessage) -> None:
        """Sends a result to the next stage's worker, or to the session if this is the last."""
        meta = {**msg.meta, **{k: v for k, v in result.meta.items()
                               if k not in ("stage_ms", "next_index", "keep", "sink_digest", "sink_chunks")}}
        meta[f"t.{self.stage}"] = result.meta.get("stage_ms", "0")
        meta[f"w.{self.stage}"] = self.proc.worker_id
        tensors = {k: v for k, v in result.tensors.items() if k != "checkpoint"}
        METRICS.stage_latency.labels(stage=self.stage).observe(float(meta[f"t.{self.stage}"]) / 1000)
        METRICS.chunks.labels(stage=self.stage).inc()
        nxt = NEXT_STAGE.get(self.stage)
        if nxt is None:
            out = StageMessage("delivery", msg.session_id, msg.chunk_index, msg.epoch, meta, tensors)
            await self.bus.publish(Subjects.session_deliveries(msg.session_id), out)
            return
        worker = meta.get(f"route.{nxt}", "")
        if not worker:
            self.log.warning("no_route", next_stage=nxt)
            return
        await self.bus.publish(Subjects.worker(nxt, worker),
                               StageMessage("chunk", msg.session_id, msg.chunk_index, msg.epoch, meta, tensors))


class EncoderWorker(StageWorker):
    """Stateless: reference images -> latents (request/reply), audio/text -> chunk conditions."""

    stage = "encoder"

    async def start(self) -> None:
        await self.bus.subscribe(Subjects.stage_work("encoder"), self.handle, queue="encoder")

    async def dispatch(self, msg: StageMessage, reply: str) -> None:
        if msg.kind == "references":
            await self.bus.respond(reply, await self.call(msg))
        elif msg.kind == "chunk":
            await self.forward(msg, await self.call(msg))


class StatefulStageWorker(StageWorker):
    """Sticky sessions with capacity, heartbeats, epochs, in-order chunks, checkpoints, restore."""

    def __init__(self, proc: ServiceProcess, backend: StageBackend):
        super().__init__(proc, backend)
        self.next_index: dict[str, int] = {}
        self.epochs: dict[str, int] = {}
        self.pending: dict[str, dict[int, StageMessage]] = {}
        self.store = SessionStore(proc.redis, proc.settings.session_ttl_s)
        self.ckpt = CheckpointStore(proc.redis, proc.settings.session_ttl_s)
        self.registry = WorkerRegistry(proc.redis, proc.settings.heartbeat_ttl_s)
        self._hb_task: asyncio.Task | None = None

    @property
    def free(self) -> int:
        return max(self.settings.capacity - len(self.next_index), 0)

    async def start(self) -> None:
        await self.bus.subscribe(Subjects.worker(self.stage, self.proc.worker_id), self.handle)
        await self.heartbeat()
        self._hb_task = asyncio.create_task(self._heartbeat_loop())

    async def heartbeat(self) -> None:
        await self.registry.heartbeat(WorkerInfo(
            self.proc.worker_id, self.stage, self.settings.capacity, self.free,
            Subjects.worker(self.stage, self.proc.worker_id)))
        METRICS.sessions_per_worker.labels(stage=self.stage, worker_id=self.proc.worker_id).set(
            len(self.next_index))

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

    async def dispatch(self, msg: StageMessage, reply: str) -> None:
        sid = msg.session_id
        if msg.kind == "open":
            await self._open(msg, reply)
        elif msg.kind == "chunk":
            await self._chunk(msg)
        elif msg.kind == "rollback":
            self.pending.pop(sid, None)
            if sid in self.next_index:
                self.epochs[sid] = msg.epoch
                answer = await self.call(StageMessage("rollback", sid, meta={"last_kept": msg.meta["last_kept"]}))
                self.next_index[sid] = int(answer.meta["next_index"])
            await self.bus.respond(reply, StageMessage("rolled_back", sid))
        elif msg.kind == "close":
            for table in (self.next_index, self.epochs, self.pending):
                table.pop(sid, None)
            await asyncio.to_thread(self.backend.call, StageMessage("close", sid))
            await self.bus.respond(reply, StageMessage("closed", sid))
            await self.heartbeat()

    async def _open(self, msg: StageMessage, reply: str) -> None:
        sid = msg.session_id
        if sid not in self.next_index and self.free <= 0:
            await self.bus.respond(reply, StageMessage("error", sid, meta={"error": "worker full"}))
            return
        tensors = {"references": np.frombuffer(await self.store.load_references(sid), dtype=np.uint8)}
        if "restore_upto" in msg.meta:
            for i, data in enumerate(await self.load_entries(sid, int(msg.meta["restore_upto"]))):
                tensors[f"entry{i}"] = np.frombuffer(data, dtype=np.uint8)
        meta = {"seed": msg.meta.get("seed", "0"),
                "lookahead": msg.meta.get("lookahead", str(self.settings.lookahead_chunks))}
        answer = await self.call(StageMessage("open", sid, epoch=msg.epoch, meta=meta, tensors=tensors))
        self.next_index[sid] = int(answer.meta["next_index"])
        self.epochs[sid] = msg.epoch
        if answer.meta.get("restored"):
            self.log.info("session_restored", entries=answer.meta["restored"])
        await self.heartbeat()
        await self.bus.respond(reply, StageMessage("opened", sid, meta={"worker": self.proc.worker_id}))

    async def load_entries(self, session_id: str, upto: int) -> list[bytes]:
        """Checkpointed sinks and last window chunks with index <= upto, oldest first."""
        stored = await self.ckpt.load(session_id, CHECKPOINT_SOURCE[self.stage])
        ordered = [data for k, data in sorted(stored.items()) if k <= upto]
        chunk = _chunk_config(self.settings)
        sinks = ordered[:chunk.sink_chunks]
        window = ordered[chunk.sink_chunks:][-chunk.window_chunks:] if chunk.window_chunks else []
        if self.stage == "decoder":
            return (sinks + window)[-1:]
        return sinks + window

    async def _chunk(self, msg: StageMessage) -> None:
        """Processes a session's chunks strictly in index order (several encoders may reorder)."""
        sid = msg.session_id
        if sid not in self.next_index:
            self.log.warning("chunk_for_unknown_session")
            return
        if msg.epoch < self.epochs.get(sid, 0):
            return  # generated before an interrupt or failover: drop
        pending = self.pending.setdefault(sid, {})
        pending[msg.chunk_index] = msg
        while sid in self.next_index:
            expected = self.next_index[sid]
            for stale in [k for k in pending if k < expected]:
                del pending[stale]
            nxt = pending.pop(expected, None)
            if nxt is None:
                return
            if nxt.epoch < self.epochs.get(sid, 0):
                continue
            result = await self.call(StageMessage("chunk", sid, nxt.chunk_index, nxt.epoch, nxt.meta, nxt.tensors))
            self.next_index[sid] = int(result.meta["next_index"])
            await self.checkpoint(sid, nxt, result)
            await self.forward(nxt, result)

    async def checkpoint(self, session_id: str, msg: StageMessage, result: StageMessage) -> None:
        if "checkpoint" in result.tensors:
            keep = [int(k) for k in result.meta.get("keep", "").split(",") if k]
            await self.ckpt.save(session_id, self.stage, msg.chunk_index,
                                 result.tensors["checkpoint"].tobytes(), keep)
        if "sink_digest" in result.meta:
            try:
                await self.store.update(session_id, sink_digest=result.meta["sink_digest"],
                                        sink_chunks=result.meta.get("sink_chunks", ""),
                                        chunks_generated=msg.chunk_index + 1)
            except SessionNotFound:
                pass


def _chunk_config(settings: Settings):
    from livestage.models.config import get_preset

    return get_preset(settings.preset).chunk


WORKERS = {"encoder": EncoderWorker, "generator": StatefulStageWorker, "refiner": StatefulStageWorker,
           "decoder": StatefulStageWorker}


def run_stage(stage: str) -> None:
    """Entry point of `python -m services.<stage>`."""
    from livestage.config import load_settings

    settings = load_settings(Settings, service=stage)

    async def main() -> None:
        proc = ServiceProcess(settings, stage)
        backend = await asyncio.to_thread(make_backend, settings, stage)
        proc.log.info("backend_ready", backend=settings.backend, preset=settings.preset)
        holder: dict[str, StageWorker] = {}

        async def setup() -> None:  # runs once NATS and Redis are connected
            worker = WORKERS[stage](proc, backend)
            worker.stage = stage
            holder["w"] = worker
            await worker.start()

        async def drain() -> None:
            worker = holder.get("w")
            if isinstance(worker, StatefulStageWorker):
                await worker.drain()
            backend.close()

        await proc.run(setup, drain)

    asyncio.run(main())

