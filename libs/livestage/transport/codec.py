"""Stage messages: a protobuf envelope (kind, session, chunk, epoch, meta, tensor headers) followed
by the raw bytes of each tensor. Layout: [4-byte big-endian envelope length][envelope][tensors]."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from livestage.protos import stages_pb2

_ALLOWED_DTYPES = {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64",
                   "bool", "bfloat16"}


@dataclass
class StageMessage:
    kind: str
    session_id: str = ""
    chunk_index: int = -1
    epoch: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())


def encode_message(msg: StageMessage) -> bytes:
    env = stages_pb2.StageEnvelope(kind=msg.kind, session_id=msg.session_id,
                                   chunk_index=msg.chunk_index, epoch=msg.epoch)
    env.meta.update(msg.meta)
    blobs = []
    offset = 0
    for name, arr in msg.tensors.items():
        arr = np.asarray(arr)
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        if arr.dtype.name not in _ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        env.tensors.add(name=name, dtype=arr.dtype.name, shape=list(arr.shape), offset=offset,
                        nbytes=arr.nbytes)
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    head = env.SerializeToString()
    return struct.pack(">I", len(head)) + head + b"".join(blobs)


def decode_message(data: bytes | memoryview) -> StageMessage:
    buf = memoryview(data)
    if len(buf) < 4:
        raise ValueError("stage message too short")
    (n,) = struct.unpack(">I", buf[:4])
    if 4 + n > len(buf):
        raise ValueError("stage message envelope truncated")
    env = stages_pb2.StageEnvelope()
    env.ParseFromString(bytes(buf[4:4 + n]))
    body = buf[4 + n:]
    tensors: dict[str, np.ndarray] = {}
    for th in env.tensors:
        if th.dtype not in _ALLOWED_DTYPES:
            raise ValueError(f"tensor {th.name!r} has unsupported dtype {th.dtype}")
        end = th.offset + th.nbytes
        if end > len(body):
            raise ValueError(f"tensor {th.name!r} truncated")
        arr = np.frombuffer(body[th.offset:end], dtype=np.dtype(th.dtype))
        expected = int(np.prod(th.shape)) if len(th.shape) else 1
        if arr.size != expected:
            raise ValueError(f"tensor {th.name!r}: {arr.size} values for shape {list(th.shape)}")
        tensors[th.name] = arr.reshape(tuple(th.shape))
    return StageMessage(kind=env.kind, session_id=env.session_id, chunk_index=env.chunk_index,
                        epoch=env.epoch, meta=dict(env.meta), tensors=tensors)
