"""Stage workers: the NATS side of the encoder, generator, refiner and decoder.

The compute lives in a stage engine (`livestage.serving.stages.engines`) reached through a
backend: in this process (`LIVESTAGE_BACKEND=local`) or on a Triton server
(`LIVESTAGE_BACKEND=triton`, `LIVESTAGE_TRITON_URL`). The worker owns what is about the service:
subjects, ordering, epochs, capacity, checkpoints in Redis and forwarding along the chunk's route.

Every stage is sticky: a session is placed on one worker per stage (`open_stage`, request/reply
on the worker's subject) and its chunks follow the route the session sends with each request:

    session --chunk_request--> encoder --encoded_chunk--> generator --latent_chunk--> refiner
      --latent_chunk--> decoder --chunk_decoded--> session (deliveries subject, no pixels)
    session --play_chunk--> decoder (its own `.play` subject) --frame_chunk--> frames subject
      (publisher, viewers), once

The decoder holds each decoded chunk until the session's chunk clock plays it, so the frames
cross the wire once and only chunks that are shown are published. `rollback_stage` forgets
history newer than a chunk and ignores older epochs; `close_stage` drops the session. The
encoder also answers `encode_references` on its queue subject for sessions being created.
Backend calls run in a thread so the event loop (heartbeats, other sessions) keeps going.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from livestage.config import Settings
from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.observability import METRICS, bind_session, extract_context, tracer
from livestage.protos import stages_pb2 as spb
from livestage.serving.process import ServiceProcess, run_service
from livestage.serving.stages.backends import LocalBackend, StageBackend, TritonBackend
from livestage.serving.stages.engines import CHECKPOINT_SOURCE, make_engine
from livestage.state import CheckpointStore, SessionNotFound, SessionStore
from livestage.transport import Envelope, build, Subjects, error_envelope, kind_of, wrap

CHUNK_KINDS = {"encoder": "chunk_request", "generator": "encoded_chunk", "refiner": "latent_chunk",
               "decoder": "latent_chunk"}
MAX_HELD_CHUNKS = 32
"""Decoded chunks a decoder keeps per session while waiting for their turn to play."""


class BackendError(RuntimeError):
    """The engine answered `stage_error` (the message says why)."""


def make_backend(settings: Settings, stage: str) -> StageBackend:
    if settings.backend == "triton":
        if not settings.triton_url:
            raise ValueError("LIVESTAGE_TRITON_URL is required with LIVESTAGE_BACKEND=triton")
        return TritonBackend(settings.triton_url, stage)
    if settings.backend != "local":
        raise ValueError(f"LIVESTAGE_BACKEND must be local or triton, got {settings.backend!r}")
    models = build_models(settings.preset, settings.weights_dir or None, seed=settings.seed,
                          allow_seeded=settings.allow_seeded_weights, compile=settings.compile)
    return LocalBackend(make_engine(stage, models, settings.session_idle_timeout_s))


@dataclass
class _Held:
    """What a worker tracks of one session it holds."""

    next_index: int
    epoch: int
    pending: dict[int, Envelope] = field(default_factory=dict)
    decoded: dict[int, Envelope] = field(default_factory=dict)  # decoder: frame_chunk per chunk


class StageWorker:
    """One stage's worker (see the module docstring); a `ServiceWorker` for the process runner."""

    def __init__(self, proc: ServiceProcess, backend: StageBackend):
        self.proc = proc
        self.stage = proc.service
        self.settings = proc.settings
        self.backend = backend
        self.log = proc.log
        self.sessions: dict[str, _Held] = {}
        self.store = SessionStore(proc.redis, proc.settings.session_ttl_s)
        self.ckpt = CheckpointStore(proc.redis, proc.settings.session_ttl_s)
        self.chunk = get_preset(proc.settings.preset).chunk

    @property
    def bus(self):
        return self.proc.bus

    # -- ServiceWorker ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.bus.subscribe(self.proc.subject, self.handle)
        if self.stage == "decoder":
            await self.bus.subscribe(Subjects.worker_play(self.stage, self.proc.worker_id), self.handle)
        if self.stage == "encoder":
            await self.bus.subscribe(Subjects.stage_work("encoder"), self.handle,
                                     queue=Subjects.queue_group("encoder"))

    def sessions_held(self) -> int:
        return len(self.sessions)

    async def drain(self) -> None:
        """SIGTERM (no longer advertised): let in-flight chunks finish, release the backend."""
        await asyncio.sleep(0.2)
        self.backend.close()

    # -- dispatch --------------------------------------------------------------------------------
    async def call(self, msg: Envelope) -> Envelope:
        reply = await asyncio.to_thread(self.backend.call, msg)
        if kind_of(reply) == "stage_error":
            raise BackendError(reply.stage_error.message)
        return reply

    async def handle(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        # One span per message, child of the sender's: a chunk is one trace across all stages.
        kind = kind_of(env)
        with tracer().start_as_current_span(f"{self.stage}.{kind}", context=extract_context(headers)):
            with bind_session(env.session_id, env.chunk_index if env.chunk_index >= 0 else None):
                try:
                    await self.dispatch(kind, env, reply)
                except Exception as exc:  # one bad message must not kill the worker
                    METRICS.errors.labels(kind=self.stage).inc()
                    self.log.exception("stage_error", kind=kind)
                    await self.bus.respond(reply, error_envelope(str(exc), like=env))

    async def dispatch(self, kind: str, env: Envelope, reply: str) -> None:
        if kind == CHUNK_KINDS[self.stage]:
            await self._chunk(env)
        elif kind == "play_chunk" and self.stage == "decoder":
            await self._play(env)
        elif kind == "open_stage":
            await self._open(env, reply)
        elif kind == "rollback_stage":
            await self._rollback(env, reply)
        elif kind == "close_stage":
            await self._close(env, reply)
        elif kind == "encode_references" and self.stage == "encoder":
            await self.bus.respond(reply, await self.call(env))
        else:
            await self.bus.respond(reply, error_envelope(f"{self.stage}: unexpected {kind or 'empty'} message",
                                                         like=env))

    # -- session lifecycle -------------------------------------------------------------------------
    async def _open(self, env: Envelope, reply: str) -> None:
        sid, req = env.session_id, env.open_stage
        if sid not in self.sessions and len(self.sessions) >= self.settings.capacity:
            await self.bus.respond(reply, error_envelope("worker full", like=env))
            return
        engine_open = build(spb.EngineOpen, seed=req.seed, lookahead=req.lookahead or self.settings.lookahead_chunks)
        if self.stage == "encoder":
            engine_open.speak_history.CopyFrom(req.speak_history)
            engine_open.listen_history.CopyFrom(req.listen_history)
            engine_open.next_index = req.restore_upto + 1 if req.restore else 0
        else:
            engine_open.references.ParseFromString(await self.store.load_references(sid))
            if req.restore:
                engine_open.restore.extend(await self.load_entries(sid, req.restore_upto))
        answer = await self.call(wrap(engine_open, sid, epoch=env.epoch))
        self.sessions[sid] = _Held(answer.engine_opened.next_index, env.epoch)
        if answer.engine_opened.restored:
            self.log.info("session_restored", entries=list(answer.engine_opened.restored))
        self.proc.beat_soon()
        await self.bus.respond(reply, wrap(spb.StageOpened(worker_id=self.proc.worker_id), sid))

    async def load_entries(self, session_id: str, upto: int) -> list[spb.HistoryEntry]:
        """Checkpointed sinks and last window chunks with index <= upto, oldest first."""
        stored = await self.ckpt.load(session_id, CHECKPOINT_SOURCE[self.stage])
        ordered = [data for k, data in sorted(stored.items()) if k <= upto]
        sinks = ordered[:self.chunk.sink_chunks]
        window = ordered[self.chunk.sink_chunks:][-self.chunk.window_chunks:] if self.chunk.window_chunks else []
        chosen = (sinks + window)[-1:] if self.stage == "decoder" else sinks + window
        return [spb.HistoryEntry.FromString(data) for data in chosen]

    async def _rollback(self, env: Envelope, reply: str) -> None:
        sid = env.session_id
        held = self.sessions.get(sid)
        if held is not None:
            held.pending.clear()
            held.epoch = env.epoch
            last_kept = env.rollback_stage.last_kept
            held.decoded = {k: v for k, v in held.decoded.items() if k <= last_kept}
            answer = await self.call(env)
            held.next_index = answer.stage_rolled_back.next_index
        await self.bus.respond(reply, wrap(spb.StageRolledBack(), sid))

    async def _close(self, env: Envelope, reply: str) -> None:
        self.sessions.pop(env.session_id, None)
        await asyncio.to_thread(self.backend.call, env)
        self.proc.beat_soon()
        await self.bus.respond(reply, wrap(spb.StageClosed(), env.session_id))

    # -- chunks --------------------------------------------------------------------------------------
    async def _chunk(self, env: Envelope) -> None:
        """Processes a session's chunks strictly in index order, dropping stale epochs."""
        sid = env.session_id
        held = self.sessions.get(sid)
        if held is None:
            self.log.warning("chunk_for_unknown_session")
            return
        if env.epoch < held.epoch:
            return  # generated before an interrupt or failover
        held.pending[env.chunk_index] = env
        while self.sessions.get(sid) is held:
            for stale in [k for k in held.pending if k < held.next_index]:
                del held.pending[stale]
            nxt = held.pending.pop(held.next_index, None)
            if nxt is None:
                return
            if nxt.epoch < held.epoch:
                continue
            result = await self.call(nxt)
            computed = result.chunk_computed
            held.next_index = computed.next_index
            await self.checkpoint(sid, nxt.chunk_index, computed)
            await self.forward(nxt, computed)

    async def checkpoint(self, session_id: str, chunk_index: int, computed: spb.ChunkComputed) -> None:
        if computed.HasField("checkpoint"):
            await self.ckpt.save(session_id, self.stage, chunk_index, computed.checkpoint.SerializeToString(),
                                 list(computed.keep))
        if computed.sink_digest:
            try:
                await self.store.update(session_id, sink_digest=computed.sink_digest,
                                        sink_chunks=",".join(str(c) for c in computed.sink_chunks),
                                        chunks_generated=chunk_index + 1)
            except SessionNotFound:
                pass

    def _timing(self, computed: spb.ChunkComputed) -> spb.StageTiming:
        METRICS.stage_latency.labels(stage=self.stage).observe(computed.compute_ms / 1000)
        METRICS.chunks.labels(stage=self.stage).inc()
        return build(spb.StageTiming, stage=self.stage, worker_id=self.proc.worker_id, compute_ms=computed.compute_ms)

    async def forward(self, msg: Envelope, computed: spb.ChunkComputed) -> None:
        """Sends a chunk's result to the next worker on its route (or, from the decoder, holds the
        frames and tells the session the chunk is ready)."""
        sid, k, epoch = msg.session_id, msg.chunk_index, msg.epoch
        timing = self._timing(computed)
        if self.stage == "encoder":
            req = msg.chunk_request
            out = computed.encoded
            body = build(spb.EncodedChunk, route=req.route, conditions=out.conditions, playback_audio=out.playback_audio,
                                    timings=[timing])
            await self._send("generator", req.route.generator, wrap(body, sid, k, epoch))
        elif self.stage == "generator":
            inp = msg.encoded_chunk
            body = build(spb.LatentChunk, route=inp.route, conditions=inp.conditions, latents=computed.latents.latents,
                                   playback_audio=inp.playback_audio, speaking=inp.conditions.speaking,
                                   user_speaking=inp.conditions.user_speaking, timings=[*inp.timings, timing])
            await self._send("refiner", inp.route.refiner, wrap(body, sid, k, epoch))
        elif self.stage == "refiner":
            inp = msg.latent_chunk
            body = build(spb.LatentChunk, route=inp.route, latents=computed.latents.latents,
                                   playback_audio=inp.playback_audio, speaking=inp.speaking,
                                   user_speaking=inp.user_speaking, timings=[*inp.timings, timing])
            await self._send("decoder", inp.route.decoder, wrap(body, sid, k, epoch))
        else:
            await self._hold_decoded(msg, computed, timing)

    async def _send(self, stage: str, worker: str, env: Envelope) -> None:
        if not worker:
            self.log.warning("no_route", next_stage=stage)
            return
        await self.bus.publish(Subjects.worker(stage, worker), env)

    # -- the decoder's side of playback --------------------------------------------------------------
    async def _hold_decoded(self, msg: Envelope, computed: spb.ChunkComputed, timing: spb.StageTiming) -> None:
        inp = msg.latent_chunk
        timings = [*inp.timings, timing]
        frames = computed.frames
        held = self.sessions.get(msg.session_id)
        if held is None:
            return
        frame_chunk = build(spb.FrameChunk, frames=frames, audio=inp.playback_audio, speaking=inp.speaking,
                            user_speaking=inp.user_speaking, timings=timings)
        held.decoded[msg.chunk_index] = wrap(frame_chunk, msg.session_id, msg.chunk_index, msg.epoch)
        for old in sorted(held.decoded)[:-MAX_HELD_CHUNKS]:
            del held.decoded[old]
        shape = [int(d) for d in frames.shape]
        decoded = build(spb.ChunkDecoded, frames=shape[0] if shape else 0, shape=shape, speaking=inp.speaking,
                        user_speaking=inp.user_speaking, timings=timings)
        await self.bus.publish(Subjects.session_deliveries(msg.session_id),
                               wrap(decoded, msg.session_id, msg.chunk_index, msg.epoch))

    async def _play(self, env: Envelope) -> None:
        """The session plays chunk k now: publish its frames once, forget what is older."""
        held = self.sessions.get(env.session_id)
        if held is None:
            return
        frames = held.decoded.pop(env.chunk_index, None)
        for old in [i for i in held.decoded if i < env.chunk_index]:
            del held.decoded[old]
        if frames is None or frames.epoch != env.epoch:
            self.log.warning("play_without_frames", held_epoch=None if frames is None else frames.epoch)
            return
        frames.frame_chunk.state = env.play_chunk.state
        await self.bus.publish(Subjects.session_frames(env.session_id), frames)


def run_stage(stage: str) -> None:
    """Entry point of `python -m services.<stage>`."""
    run_service(stage, Settings, lambda proc, backend: StageWorker(proc, backend),
                load=lambda settings: make_backend(settings, stage))
