"""Conversions between runtime objects (chunk inputs, history entries, references) and their typed
wire messages. One place, so every stage reads what the previous one wrote.

Tensors keep the model's dtype on the wire (bfloat16 latents stay 2 bytes a value); the receiver
converts to its own device and dtype once, on arrival.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from livestage.protos import session_pb2 as pb
from livestage.protos import stages_pb2 as spb
from livestage.runtime.stages import ChunkInputs, HistoryEntry, ReferenceLatents
from livestage.transport.codec import build, tensor, to_numpy, to_torch

KIND_BY_NAME = {"global": pb.REFERENCE_KIND_GLOBAL, "view": pb.REFERENCE_KIND_VIEW,
                "expression": pb.REFERENCE_KIND_EXPRESSION}
NAME_BY_KIND = {v: k for k, v in KIND_BY_NAME.items()}


def conditions_to_pb(inputs: ChunkInputs) -> spb.ChunkConditions:
    return build(spb.ChunkConditions, text=tensor(inputs.text), speak=tensor(inputs.speak),
                               listen=tensor(inputs.listen), directive=inputs.directive,
                               speaking=inputs.speaking, user_speaking=inputs.user_speaking)


def conditions_from_pb(c: spb.ChunkConditions, chunk_index: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> ChunkInputs:
    return ChunkInputs(chunk_index=chunk_index, text=to_torch(c.text, device, dtype, "conditions.text"),
                       speak=to_torch(c.speak, device, dtype, "conditions.speak"),
                       listen=to_torch(c.listen, device, dtype, "conditions.listen"),
                       directive=c.directive, speaking=c.speaking, user_speaking=c.user_speaking)


def entry_to_pb(entry: HistoryEntry) -> spb.HistoryEntry:
    return build(spb.HistoryEntry, chunk_index=entry.chunk_index, latent=tensor(entry.latent),
                            timestep=entry.timestep, inputs=conditions_to_pb(entry.inputs))


def entry_from_pb(e: spb.HistoryEntry, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> HistoryEntry:
    return HistoryEntry(e.chunk_index, to_torch(e.latent, device, dtype, "entry.latent"), e.timestep,
                        conditions_from_pb(e.inputs, e.chunk_index, device, dtype))


def references_to_pb(refs: ReferenceLatents) -> spb.ReferenceSet:
    return build(spb.ReferenceSet, references=[build(spb.ReferenceLatent, kind=KIND_BY_NAME[kind], latent=tensor(latent))
                                        for kind, latent in refs])


def references_from_pb(refs: spb.ReferenceSet, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> ReferenceLatents:
    out = []
    for i, ref in enumerate(refs.references):
        if ref.kind not in NAME_BY_KIND:
            raise ValueError(f"references[{i}].kind: unknown reference kind {ref.kind}")
        out.append((NAME_BY_KIND[ref.kind], to_torch(ref.latent, device, dtype, f"references[{i}].latent")))
    return out


def audio_slice(start_sample: int, samples: np.ndarray) -> spb.AudioSlice:
    return build(spb.AudioSlice, start_sample=start_sample, samples=tensor(np.asarray(samples, np.float32)))


def audio_from_slice(s: spb.AudioSlice, name: str) -> np.ndarray:
    """The slice's samples as float32 mono; ValueError naming `name` otherwise."""
    if not s.HasField("samples"):
        return np.zeros(0, np.float32)
    samples = to_numpy(s.samples, f"{name}.samples")
    if samples.ndim != 1 or samples.dtype != np.float32:
        raise ValueError(f"{name}.samples: must be mono float32, got {samples.dtype} {list(samples.shape)}")
    if s.start_sample < 0:
        raise ValueError(f"{name}.start_sample: must be >= 0, got {s.start_sample}")
    return samples


def sink_digest(entries: list[HistoryEntry], sink_chunks: int) -> str:
    """A short digest of the sink latents: identity anchors must survive failover unchanged."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.chunk_index)[:sink_chunks]:
        h.update(str(e.chunk_index).encode())
        h.update(np.round(e.latent.detach().to("cpu", torch.float32).numpy(), 4).tobytes())
    return h.hexdigest()[:16]
