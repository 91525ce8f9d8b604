"""How a stage service reaches its engine: in-process (`LocalBackend`) or a Triton server
(`TritonBackend`, tritonclient gRPC). Both take and return `StageMessage`s, so a stage service does
not know which one it talks to (`LIVESTAGE_BACKEND=local|triton`).

Over Triton a request is one UINT8 tensor `REQUEST` holding the encoded `StageMessage` (envelope +
raw tensor bytes) and the reply one UINT8 tensor `RESPONSE`. Stateful stages send the session as the
sequence id: `open` starts the sequence, `close` ends it, so every request of a session reaches the
model instance that holds its caches.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np

from livestage.transport.codec import StageMessage, decode_message, encode_message

STATS_SEQUENCE_ID = 1  # a one-shot sequence for `stats` requests to stateful models


class StageBackend(Protocol):
    def call(self, msg: StageMessage) -> StageMessage: ...

    def close(self) -> None: ...


class LocalBackend:
    def __init__(self, engine):
        self.engine = engine

    def call(self, msg: StageMessage) -> StageMessage:
        if hasattr(self.engine, "evict_idle"):
            self.engine.evict_idle()
        return self.engine.handle(msg)

    def close(self) -> None:
        return None


def sequence_id(session_id: str) -> int:
    """A stable non-zero uint64 (< 2^63) correlation id for a session id."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (2**63 - 1)) | 2


class TritonBackend:
    def __init__(self, url: str, model: str, stateful: bool, timeout_s: float = 60.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.stateful = stateful
        self.timeout_s = timeout_s

    def call(self, msg: StageMessage) -> StageMessage:
        g = self._grpc
        data = np.frombuffer(encode_message(msg), dtype=np.uint8).reshape(1, -1)  # [batch, bytes]
        inp = g.InferInput("REQUEST", list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        kwargs: dict = {}
        if self.stateful:
            if msg.kind == "stats":
                kwargs = dict(sequence_id=STATS_SEQUENCE_ID, sequence_start=True, sequence_end=True)
            else:
                kwargs = dict(sequence_id=sequence_id(msg.session_id),
                              sequence_start=msg.kind == "open", sequence_end=msg.kind == "close")
        from tritonclient.utils import InferenceServerException

        try:
            result = self.client.infer(self.model, [inp], outputs=[g.InferRequestedOutput("RESPONSE")],
                                       client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as exc:
            text = str(exc)
            if "START flag" in text:  # Triton no longer holds this sequence: ended or expired
                text = f"{self.model}: unknown session {msg.session_id!r} (sequence not open on Triton)"
            return StageMessage("error", msg.session_id, msg.chunk_index, msg.epoch, {"error": text})
        raw = result.as_numpy("RESPONSE").reshape(-1)
        reply = decode_message(raw.tobytes())  # trailing padding (batched replies) is ignored
        reply.session_id = msg.session_id
        return reply

    def close(self) -> None:
        self.client.close()


def chain_chunk(backends: dict[str, StageBackend], msg: StageMessage) -> dict[str, StageMessage]:
    """Runs one chunk request through encoder -> generator -> refiner -> decoder backends, passing
    each stage's tensors on as the services do; returns every stage's reply (for tests and
    benchmarks that call the engines without NATS)."""
    replies: dict[str, StageMessage] = {}
    current = msg
    for stage in ("encoder", "generator", "refiner", "decoder"):
        reply = backends[stage].call(current)
        if reply.kind == "error":
            raise RuntimeError(f"{stage}: {reply.meta.get('error')}")
        replies[stage] = reply
        tensors = {k: v for k, v in reply.tensors.items() if k != "checkpoint"}
        if stage != "encoder":
            tensors = {**current.tensors, **tensors}
        current = StageMessage("chunk", msg.session_id, msg.chunk_index, msg.epoch,
                               {**current.meta, **reply.meta}, tensors)
    return replies
