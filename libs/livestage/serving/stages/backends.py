"""How a stage service reaches its engine: in-process (`LocalBackend`) or a Triton server
(`TritonBackend`, tritonclient gRPC). Both take and return `StageEnvelope`s, so a stage service does
not know which one it talks to (`LIVESTAGE_BACKEND=local|triton`).

Over Triton a request is one UINT8 tensor `REQUEST` holding the length-framed envelope and the
reply one UINT8 tensor `RESPONSE`. Every stage keeps per-session state, so the session is the
sequence id: `engine_open` starts the sequence, `close_stage` ends it, and every request of a
session reaches the model instance that holds its state. Requests that belong to no session
(`encode_references` for a session being created, `engine_stats_request`) are one-shot sequences.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np

from livestage.protos import stages_pb2 as spb
from livestage.serving.stages.wire import KIND_BY_NAME
from livestage.transport.codec import (Envelope, build, decode_framed, encode_framed, error_envelope, kind_of,
                                       tensor, wrap)

STATS_SEQUENCE_ID = 1  # a one-shot sequence for `engine_stats_request`


class StageBackend(Protocol):
    def call(self, msg: Envelope) -> Envelope: ...

    def close(self) -> None: ...


class LocalBackend:
    def __init__(self, engine):
        self.engine = engine

    def call(self, msg: Envelope) -> Envelope:
        self.engine.evict_idle()
        return self.engine.handle(msg)

    def close(self) -> None:
        return None


def sequence_id(session_id: str) -> int:
    """A stable non-zero uint64 (< 2^63) correlation id for a session id."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (2**63 - 1)) | 2


class TritonBackend:
    def __init__(self, url: str, model: str, timeout_s: float = 60.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.timeout_s = timeout_s

    @staticmethod
    def _sequence(msg: Envelope) -> dict:
        kind = kind_of(msg)
        if kind == "engine_stats_request":
            return dict(sequence_id=STATS_SEQUENCE_ID, sequence_start=True, sequence_end=True)
        if kind == "encode_references":
            return dict(sequence_id=sequence_id(msg.session_id + "/references"), sequence_start=True,
                        sequence_end=True)
        return dict(sequence_id=sequence_id(msg.session_id), sequence_start=kind == "engine_open",
                    sequence_end=kind == "close_stage")

    def call(self, msg: Envelope) -> Envelope:
        g = self._grpc
        data = np.frombuffer(encode_framed(msg), dtype=np.uint8).reshape(1, -1)  # [batch, bytes]
        inp = g.InferInput("REQUEST", list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        from tritonclient.utils import InferenceServerException

        try:
            result = self.client.infer(self.model, [inp], outputs=[g.InferRequestedOutput("RESPONSE")],
                                       client_timeout=self.timeout_s, **self._sequence(msg))
        except InferenceServerException as exc:
            text = str(exc)
            if "START flag" in text:  # Triton no longer holds this sequence: ended or expired
                text = f"{self.model}: unknown session {msg.session_id!r} (sequence not open on Triton)"
            return error_envelope(text, like=msg)
        raw = result.as_numpy("RESPONSE").reshape(-1)
        reply = decode_framed(raw.tobytes())  # trailing padding (batched replies) is ignored
        reply.session_id = msg.session_id
        return reply

    def close(self) -> None:
        self.client.close()


def chain_chunk(backends: dict[str, StageBackend], request: Envelope) -> dict[str, Envelope]:
    """Runs one `chunk_request` through encoder -> generator -> refiner -> decoder backends,
    passing each stage's output on as the stage workers do; returns every stage's
    `chunk_computed` reply (for tests and benchmarks that call the engines without NATS)."""
    replies: dict[str, Envelope] = {}
    current = request
    for stage in ("encoder", "generator", "refiner", "decoder"):
        reply = backends[stage].call(current)
        if kind_of(reply) != "chunk_computed":
            problem = reply.stage_error.message if kind_of(reply) == "stage_error" else kind_of(reply)
            raise RuntimeError(f"{stage}: {problem}")
        replies[stage] = reply
        out = reply.chunk_computed
        if stage == "encoder":
            body = build(spb.EncodedChunk, conditions=out.encoded.conditions)
        elif stage == "generator":
            body = build(spb.LatentChunk, conditions=current.encoded_chunk.conditions, latents=out.latents.latents)
        else:
            body = build(spb.LatentChunk, latents=out.latents.latents)
        current = wrap(body, request.session_id, request.chunk_index, request.epoch)
    return replies


def encode_references(backend: StageBackend, session_id: str, images: list[tuple[str, Any]]) -> Envelope:
    """Asks an encoder backend to encode reference images ((kind, [3, H, W] in [-1, 1]) pairs)."""

    images_pb = [build(spb.ReferenceImageTensor, kind=KIND_BY_NAME[kind], image=tensor(img)) for kind, img in images]
    return backend.call(wrap(build(spb.EncodeReferences, images=images_pb), session_id))


def open_engines(backends: dict[str, StageBackend], session_id: str, references: Any, seed: int = 0,
                 lookahead: int = 2) -> dict[str, Envelope]:
    """Opens a session on every stage's backend (`references`: a ReferenceSet); the replies."""

    opened = {}
    for stage, backend in backends.items():
        body = build(spb.EngineOpen, seed=seed, lookahead=lookahead)
        if stage != "encoder":
            body.references.CopyFrom(references)
        opened[stage] = backend.call(wrap(body, session_id))
    return opened
