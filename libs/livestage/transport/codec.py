"""Stage messages: tensors as raw bytes behind a small protobuf envelope.

Layout of one message body: `[4-byte big-endian envelope length][StageEnvelope][tensor bytes]`.
The envelope (stages.proto) carries kind, session id, chunk index, epoch, string meta and one
`TensorHeader` (name, dtype, shape, offset, nbytes, session id, chunk index) per tensor, so the
receiver reads tensors with `np.frombuffer` — no pickling (a network peer must never be able to
run code in a worker) and no copies beyond the one the socket read made. The same bytes are also
what we store in Redis (checkpoints, references), so the layout is stable: readers ignore
trailing bytes and unknown envelope fields.

Tensors may be numpy arrays or torch tensors (moved to CPU). bfloat16, which numpy lacks, travels
as its raw 2-byte values and decodes to `ml_dtypes.bfloat16` arrays when that package is present,
to float32 (exact) otherwise, or to `torch.bfloat16` with `decode_message(..., as_torch=True)`.
Decoded numpy arrays are read-only views of the message bytes; copy before writing into them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from livestage.protos import stages_pb2

__all__ = ["ALLOWED_DTYPES", "CODEC_VERSION", "StageMessage", "decode_message", "decode_tensors",
           "encode_message", "encode_tensors", "to_numpy"]

CODEC_VERSION = "1"
ALLOWED_DTYPES = frozenset({"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                            "uint64", "float16", "float32", "float64", "bfloat16"})
_LEN = struct.Struct(">I")

try:  # numpy has no bfloat16; ml_dtypes (pulled in by several ML packages) adds it
    import ml_dtypes as _ml_dtypes

    _NP_BF16: np.dtype | None = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    _NP_BF16 = None


@dataclass
class StageMessage:
    kind: str
    session_id: str = ""
    chunk_index: int = -1
    epoch: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(int(a.nbytes) if hasattr(a, "nbytes") else 0 for a in self.tensors.values())


def to_numpy(value: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous little-endian array with the bytes to send, and the dtype name to announce.

    torch tensors are detached and moved to CPU; bfloat16 (torch or ml_dtypes) is sent as its
    raw 16-bit patterns under the name "bfloat16".
    """
    if type(value).__module__.startswith("torch"):
        import torch

        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        arr = t.numpy()
    else:
        arr = np.asarray(value)
    name = arr.dtype.name
    if _NP_BF16 is not None and arr.dtype == _NP_BF16:
        return _c_order(arr).view(np.uint16), "bfloat16"
    if name not in ALLOWED_DTYPES:
        raise ValueError(f"unsupported dtype {arr.dtype}")
    if arr.dtype.byteorder == ">":  # the wire is little-endian, as every machine we run on
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return _c_order(arr), name


def _c_order(arr: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def encode_message(msg: StageMessage) -> bytes:
    env = stages_pb2.StageEnvelope(kind=msg.kind, session_id=msg.session_id,
                                   chunk_index=msg.chunk_index, epoch=msg.epoch)
    env.meta.update({str(k): str(v) for k, v in msg.meta.items()})
    blobs: list[bytes | memoryview] = []
    offset = 0
    for name, value in msg.tensors.items():
        try:
            arr, dtype = to_numpy(value)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        env.tensors.add(name=name, dtype=dtype, shape=list(arr.shape), offset=offset,
                        nbytes=arr.nbytes, session_id=msg.session_id, chunk_index=msg.chunk_index)
        blobs.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
        offset += arr.nbytes
    head = env.SerializeToString()
    return b"".join([_LEN.pack(len(head)), head, *blobs])


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(name).newbyteorder("<") if np.dtype(name).itemsize > 1 else np.dtype(name)


def _to_array(raw: memoryview, dtype: str, shape: tuple[int, ...], as_torch: bool) -> Any:
    if as_torch:
        import torch

        if dtype == "bfloat16":
            flat = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16) if len(raw) else \
                torch.empty(0, dtype=torch.bfloat16)
            return flat.reshape(shape)
        return torch.from_numpy(np.frombuffer(raw, dtype=_numpy_dtype(dtype)).copy()).reshape(shape)
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2")
        if _NP_BF16 is not None:
            return bits.view(_NP_BF16).reshape(shape)
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)  # exact widening
    return np.frombuffer(raw, dtype=_numpy_dtype(dtype)).reshape(shape)


def decode_message(data: bytes | bytearray | memoryview, *, as_torch: bool = False) -> StageMessage:
    """Parses a message from `encode_message`; raises ValueError (never anything else) on bad input."""
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(buf) < _LEN.size:
        raise ValueError("stage message too short")
    (n,) = _LEN.unpack(buf[:_LEN.size])
    if _LEN.size + n > len(buf):
        raise ValueError("stage message envelope truncated")
    env = stages_pb2.StageEnvelope()
    try:
        env.ParseFromString(bytes(buf[_LEN.size:_LEN.size + n]))
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"stage message envelope malformed: {exc}") from None
    body = buf[_LEN.size + n:]
    tensors: dict[str, Any] = {}
    for th in env.tensors:
        if th.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {th.name!r} has unsupported dtype {th.dtype}")
        shape = tuple(int(d) for d in th.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {th.name!r} has a negative dimension in {list(shape)}")
        itemsize = 2 if th.dtype == "bfloat16" else np.dtype(th.dtype).itemsize
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * itemsize != th.nbytes:
            raise ValueError(f"tensor {th.name!r}: {th.nbytes} bytes for shape {list(shape)} "
                             f"of {th.dtype}")
        end = th.offset + th.nbytes
        if end > len(body):
            raise ValueError(f"tensor {th.name!r} truncated")
        tensors[th.name] = _to_array(body[th.offset:end], th.dtype, shape, as_torch)
    return StageMessage(kind=env.kind, session_id=env.session_id, chunk_index=env.chunk_index,
                        epoch=env.epoch, meta=dict(env.meta), tensors=tensors)


# -- NATS-facing convenience: headers + payload ----------------------------------------------

H_CODEC = "ls-codec"
H_KIND = "ls-kind"
H_SESSION = "ls-session"
H_CHUNK = "ls-chunk"
H_EPOCH = "ls-epoch"


def encode_tensors(tensors: Mapping[str, Any], meta: Mapping[str, object] | None = None, *,
                   kind: str = "tensors", session_id: str = "", chunk_index: int = -1,
                   epoch: int = 0) -> tuple[dict[str, str], bytes]:
    """Tensors (numpy or torch) and string metadata -> (NATS headers, payload).

    The headers repeat kind/session/chunk/epoch so routers, monitors and `nats sub` can see what
    a message is without decoding it; the payload is self-contained (`decode_message` alone
    recovers everything). Trace context is added by the bus at publish time.
    """
    msg = StageMessage(kind, session_id, chunk_index, epoch,
                       {str(k): str(v) for k, v in (meta or {}).items()}, dict(tensors))
    return message_headers(msg), encode_message(msg)


def message_headers(msg: StageMessage) -> dict[str, str]:
    headers = {H_CODEC: CODEC_VERSION, H_KIND: msg.kind, H_CHUNK: str(msg.chunk_index),
               H_EPOCH: str(msg.epoch)}
    if msg.session_id:
        headers[H_SESSION] = msg.session_id
    return headers


def decode_tensors(headers: Mapping[str, str] | None, payload: bytes | memoryview, *,
                   as_torch: bool = False) -> StageMessage:
    """(headers, payload) from `encode_tensors` -> StageMessage; checks the codec version."""
    version = (headers or {}).get(H_CODEC, CODEC_VERSION)
    if version != CODEC_VERSION:
        raise ValueError(f"unsupported stage message codec {version!r} (this build reads "
                         f"{CODEC_VERSION!r})")
    return decode_message(payload, as_torch=as_torch)
