"""Conversions between runtime objects (chunk inputs, latents, history entries, references) and
`StageMessage` tensors. One place, so every stage reads what the previous one wrote."""

from __future__ import annotations

import numpy as np
import torch

from livestage.runtime.stages import ChunkInputs, HistoryEntry, ReferenceLatents
from livestage.transport import StageMessage, decode_message, encode_message


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def to_torch(a: np.ndarray, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True)).to(device=device, dtype=dtype)


def inputs_to_tensors(inputs: ChunkInputs) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors = {"text": to_np(inputs.text), "speak": to_np(inputs.speak), "listen": to_np(inputs.listen)}
    meta = {"directive": inputs.directive, "speaking": str(int(inputs.speaking)),
            "user_speaking": str(int(inputs.user_speaking))}
    return tensors, meta


def inputs_from_message(msg: StageMessage, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> ChunkInputs:
    t = msg.tensors
    return ChunkInputs(
        chunk_index=msg.chunk_index, text=to_torch(t["text"], device, dtype),
        speak=to_torch(t["speak"], device, dtype), listen=to_torch(t["listen"], device, dtype),
        directive=msg.meta.get("directive", ""), speaking=msg.meta.get("speaking") == "1",
        user_speaking=msg.meta.get("user_speaking") == "1",
    )


def encode_entry(entry: HistoryEntry) -> bytes:
    tensors, meta = inputs_to_tensors(entry.inputs)
    tensors["latent"] = to_np(entry.latent)
    meta["timestep"] = repr(entry.timestep)
    return encode_message(StageMessage("history", chunk_index=entry.chunk_index, meta=meta,
                                       tensors=tensors))


def decode_entry(data: bytes, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> HistoryEntry:
    msg = decode_message(data)
    return HistoryEntry(msg.chunk_index, to_torch(msg.tensors["latent"], device, dtype),
                        float(msg.meta["timestep"]), inputs_from_message(msg, device, dtype))


def encode_references(refs: ReferenceLatents) -> bytes:
    tensors = {f"ref{i}": to_np(latent) for i, (_, latent) in enumerate(refs)}
    meta = {"kinds": ",".join(kind for kind, _ in refs)}
    return encode_message(StageMessage("references", meta=meta, tensors=tensors))


def decode_references(data: bytes, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> ReferenceLatents:
    msg = decode_message(data)
    kinds = [k for k in msg.meta.get("kinds", "").split(",") if k]
    return [(kind, to_torch(msg.tensors[f"ref{i}"], device, dtype)) for i, kind in enumerate(kinds)]


def sink_digest(entries: list[HistoryEntry], sink_chunks: int) -> str:
    """A short digest of the sink latents: identity anchors must survive failover unchanged."""
    import hashlib

    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.chunk_index)[:sink_chunks]:
        h.update(str(e.chunk_index).encode())
        h.update(np.round(to_np(e.latent), 4).tobytes())
    return h.hexdigest()[:16]
