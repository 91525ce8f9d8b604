"""Typed stage messages: one protobuf `StageEnvelope` per NATS message, one body kind each.

Every message between services is a `livestage.v1.StageEnvelope` (protos/livestage/v1/stages.proto):
routing data every kind has (session id, chunk index, epoch) and a `body` oneof with exactly one
typed message. Tensors are `Tensor` fields (dtype enum, shape, raw little-endian bytes), so a
receiver never unpickles anything a peer sent (a network peer must never run code in a worker) and
bfloat16 latents travel as their 2-byte patterns in the model's dtype.

    env = wrap(pb.RollbackStage(last_kept=3), session_id=sid, epoch=2)
    data = encode(env)                  # bytes for NATS, Redis or a Triton UINT8 tensor
    env = decode(data)                  # ValueError (never anything else) on malformed input
    kind_of(env) == "rollback_stage"; env.rollback_stage.last_kept == 3

`tensor(x)` turns a numpy array or torch tensor into a `Tensor`; `to_numpy` / `to_torch` read one
back, checking that dtype, shape and byte count agree.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from livestage.protos import stages_pb2 as spb

__all__ = ["CODEC_VERSION", "Envelope", "build", "decode", "encode", "error_envelope", "kind_of",
           "message_headers", "tensor", "to_numpy", "to_torch", "wrap"]

CODEC_VERSION = "2"
Envelope = spb.StageEnvelope

_BODY = Envelope.DESCRIPTOR.oneofs_by_name["body"]
_FIELD_BY_TYPE: dict[str, str] = {f.message_type.full_name: f.name for f in _BODY.fields}
assert len(_FIELD_BY_TYPE) == len(_BODY.fields), "each body type appears once in the envelope"

try:  # numpy has no bfloat16; ml_dtypes (pulled in by several ML packages) adds it
    import ml_dtypes as _ml_dtypes

    _NP_BF16: np.dtype | None = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    _NP_BF16 = None

_NP_BY_DTYPE: dict[int, np.dtype] = {
    spb.DTYPE_BOOL: np.dtype("bool"), spb.DTYPE_UINT8: np.dtype("uint8"),
    spb.DTYPE_INT8: np.dtype("int8"), spb.DTYPE_INT16: np.dtype("<i2"),
    spb.DTYPE_UINT16: np.dtype("<u2"), spb.DTYPE_INT32: np.dtype("<i4"),
    spb.DTYPE_INT64: np.dtype("<i8"), spb.DTYPE_FLOAT16: np.dtype("<f2"),
    spb.DTYPE_FLOAT32: np.dtype("<f4"), spb.DTYPE_FLOAT64: np.dtype("<f8"),
}
_DTYPE_BY_NAME: dict[str, int] = {np.dtype(d).name: k for k, d in _NP_BY_DTYPE.items()}
_ITEMSIZE = {**{k: d.itemsize for k, d in _NP_BY_DTYPE.items()}, spb.DTYPE_BFLOAT16: 2}


def wrap(body: Any, session_id: str = "", chunk_index: int = -1, epoch: int = 0) -> Envelope:
    """An envelope around one body message (the oneof field is found from the body's type)."""
    name = _FIELD_BY_TYPE.get(body.DESCRIPTOR.full_name)
    if name is None:
        raise TypeError(f"{body.DESCRIPTOR.full_name} is not a stage message body")
    env = Envelope(session_id=session_id, chunk_index=chunk_index, epoch=epoch)
    getattr(env, name).CopyFrom(body)
    return env


def build(cls: type, **fields: Any) -> Any:
    """`cls(**fields)`, but message-valued fields are copied with `CopyFrom`: upb's constructor
    merges sub-messages field by field, which costs ~1 ms per MB of tensor bytes (a frame chunk
    would pay it at every hop); `CopyFrom` moves the bytes at memcpy speed."""
    msg = cls()
    for name, value in fields.items():
        if value is None:
            continue
        if hasattr(value, "DESCRIPTOR") and hasattr(value, "CopyFrom"):
            getattr(msg, name).CopyFrom(value)
        elif isinstance(value, (list, tuple)):
            target = getattr(msg, name)
            if value and hasattr(value[0], "CopyFrom"):
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        else:
            setattr(msg, name, value)
    return msg


def kind_of(env: Envelope) -> str:
    """The body's field name ("chunk_request", "stage_error", ...), "" for an empty envelope."""
    return env.WhichOneof("body") or ""


def error_envelope(message: str, field: str = "", like: Envelope | None = None) -> Envelope:
    """A `StageError` reply addressed like the request it answers."""
    return wrap(spb.StageError(message=message, field=field),
                like.session_id if like is not None else "",
                like.chunk_index if like is not None else -1, like.epoch if like is not None else 0)


def encode(env: Envelope) -> bytes:
    return env.SerializeToString()


def decode(data: bytes | bytearray | memoryview) -> Envelope:
    """Parses `encode`'s bytes; raises ValueError (never anything else) on bad input."""
    env = Envelope()
    try:
        env.ParseFromString(bytes(data))
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"stage message malformed: {exc}") from None
    if not kind_of(env):
        raise ValueError("stage message has no body")
    return env


# -- tensors ------------------------------------------------------------------------------------

def _c_order(arr: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def tensor(value: Any) -> spb.Tensor:
    """A numpy array or torch tensor (any device) as a `Tensor`; bfloat16 stays bfloat16."""
    if type(value).__module__.startswith("torch"):
        import torch

        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy()
            return spb.Tensor(dtype=spb.DTYPE_BFLOAT16, shape=list(t.shape), data=raw.tobytes())
        arr = t.numpy()
    else:
        arr = np.asarray(value)
    if _NP_BF16 is not None and arr.dtype == _NP_BF16:
        return spb.Tensor(dtype=spb.DTYPE_BFLOAT16, shape=list(arr.shape),
                          data=_c_order(arr).view(np.uint16).tobytes())
    code = _DTYPE_BY_NAME.get(arr.dtype.name)
    if code is None:
        raise ValueError(f"unsupported dtype {arr.dtype}")
    arr = _c_order(arr.astype(_NP_BY_DTYPE[code], copy=False))  # little-endian on the wire
    return spb.Tensor(dtype=code, shape=list(arr.shape), data=arr.tobytes())


def _checked(t: spb.Tensor, name: str) -> tuple[tuple[int, ...], int, bytes]:
    """Shape, element count and the bytes (read once: each read of a bytes field copies)."""
    if t.dtype not in _ITEMSIZE:
        raise ValueError(f"{name}: unsupported dtype {t.dtype}")
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{name}: negative dimension in {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    data = t.data
    if count * _ITEMSIZE[t.dtype] != len(data):
        raise ValueError(f"{name}: {len(data)} bytes for shape {list(shape)} of "
                         f"{spb.DType.Name(t.dtype)}")
    return shape, count, data


def to_numpy(t: spb.Tensor, name: str = "tensor") -> np.ndarray:
    """A read-only array over the tensor's bytes; bfloat16 as `ml_dtypes.bfloat16` when present,
    else widened exactly to float32. ValueError names `name` when dtype, shape and bytes disagree."""
    shape, _, data = _checked(t, name)
    if t.dtype == spb.DTYPE_BFLOAT16:
        bits = np.frombuffer(data, dtype="<u2")
        if _NP_BF16 is not None:
            return bits.view(_NP_BF16).reshape(shape)
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=_NP_BY_DTYPE[t.dtype]).reshape(shape)


def to_torch(t: spb.Tensor, device: Any = "cpu", dtype: Any = None, name: str = "tensor") -> Any:
    """The tensor as a torch tensor on `device`, converted to `dtype` when given (a no-op when it
    already is: latents sent in the model's dtype arrive without a round trip through float32)."""
    import torch

    shape, count, data = _checked(t, name)
    writable = bytearray(data)  # the one copy: torch wants memory it may write to
    if t.dtype == spb.DTYPE_BFLOAT16:
        out = (torch.frombuffer(writable, dtype=torch.bfloat16) if count else
               torch.empty(0, dtype=torch.bfloat16)).reshape(shape)
    else:
        out = torch.from_numpy(np.frombuffer(writable, dtype=_NP_BY_DTYPE[t.dtype]).reshape(shape))
    return out.to(device=device, dtype=dtype) if dtype is not None else out.to(device)


def is_set(t: spb.Tensor) -> bool:
    """True when a Tensor field was filled (an unset message field reads as an empty default)."""
    return t.dtype != spb.DTYPE_UNSPECIFIED


# -- NATS headers -------------------------------------------------------------------------------

H_CODEC = "ls-codec"
H_KIND = "ls-kind"
H_SESSION = "ls-session"
H_CHUNK = "ls-chunk"
H_EPOCH = "ls-epoch"


def message_headers(env: Envelope) -> dict[str, str]:
    """Headers repeating kind/session/chunk/epoch, so monitors and `nats sub` can tell what a
    message is without decoding it (the body alone is self-contained)."""
    headers = {H_CODEC: CODEC_VERSION, H_KIND: kind_of(env), H_CHUNK: str(env.chunk_index),
               H_EPOCH: str(env.epoch)}
    if env.session_id:
        headers[H_SESSION] = env.session_id
    return headers


def check_codec(headers: Mapping[str, str] | None) -> None:
    version = (headers or {}).get(H_CODEC, CODEC_VERSION)
    if version != CODEC_VERSION:
        raise ValueError(f"unsupported stage message codec {version!r} (this build reads "
                         f"{CODEC_VERSION!r})")


# -- length-framed bytes (inside Triton tensors, which pad batched rows) ------------------------

_FRAME = 4


def encode_framed(env: Envelope) -> bytes:
    """`[4-byte big-endian length][envelope]`: readers ignore trailing padding."""
    data = encode(env)
    return len(data).to_bytes(_FRAME, "big") + data


def decode_framed(data: bytes | bytearray | memoryview) -> Envelope:
    buf = memoryview(data).cast("B")
    if len(buf) < _FRAME:
        raise ValueError("framed stage message too short")
    n = int.from_bytes(buf[:_FRAME], "big")
    if _FRAME + n > len(buf):
        raise ValueError("framed stage message truncated")
    return decode(buf[_FRAME:_FRAME + n])
