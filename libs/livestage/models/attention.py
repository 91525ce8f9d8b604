"""How the DiT's self-attention sees other tokens: one `AttentionPlan` per forward pass.

The DiT blocks compute q/k/v (after q/k RMSNorm, before RoPE) and hand them to the plan, which
decides positions, which keys are visible and what gets remembered:

- `BidirectionalAttention`: every token sees every token at its grid position (the reference Wan
  forward; the teacher).
- `StreamingChunkAttention`: the current chunk sees the reference tokens, the cached history
  (sinks + window, re-roped at read time) and itself; optionally captures its own pre-RoPE K/V so
  the caller can commit them to the cache.
- `ReferencePrefillAttention`: reference-image tokens see only each other; their pre-RoPE K/V go
  into the cache once per session.
- `MaskedSequenceAttention`: explicit positions and a boolean mask over a whole sequence (used to
  check that the streaming path equals one full-sequence forward).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from livestage.models.kv_cache import ChunkKVCache
from livestage.models.rope import Rotary3D, RotaryTable, apply_rotary


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on [B, L, heads, d] tensors (returns the same layout)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class AttentionPlan(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, L, heads, d], pre-RoPE. Returns attention output [B, L, heads, d]."""
        ...


class BidirectionalAttention:
    """Full attention with RoPE at fixed per-token positions.

    `window` = (left, right) limits each query i to keys i-left..i+right in token order, the
    reference's local-attention option; (-1, -1) is global attention.
    """

    def __init__(self, rotary: Rotary3D, positions: torch.Tensor,
                 window: tuple[int, int] = (-1, -1)):
        self.table: RotaryTable = rotary.table(positions)
        self.mask = local_window_mask(len(positions), window)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        table = self.table.to(q.device, torch.float32)
        mask = None if self.mask is None else self.mask.to(q.device)
        return sdpa(apply_rotary(q, table), apply_rotary(k, table), v, mask)


def local_window_mask(length: int, window: tuple[int, int]) -> torch.Tensor | None:
    """Boolean [L, L] mask of a (left, right) token window; None when the window is global."""
    left, right = window
    if left < 0 and right < 0:
        return None
    idx = torch.arange(length)
    offset = idx[None, :] - idx[:, None]  # key - query
    mask = torch.ones(length, length, dtype=torch.bool)
    if left >= 0:
        mask &= offset >= -left
    if right >= 0:
        mask &= offset <= right
    return mask


class MaskedSequenceAttention:
    """Attention over a whole sequence with explicit positions and a [L, L] visibility mask."""

    def __init__(self, rotary: Rotary3D, positions: torch.Tensor, mask: torch.Tensor):
        self.table = rotary.table(positions)
        self.mask = mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        table = self.table.to(q.device, torch.float32)
        return sdpa(apply_rotary(q, table), apply_rotary(k, table), v, self.mask.to(q.device))


class _DeviceTable:
    """A rotary table moved to the activations' device once per forward pass, not once per layer."""

    def __init__(self, table: RotaryTable):
        self.table = table
        self._on: RotaryTable | None = None

    def on(self, device: torch.device) -> RotaryTable:
        if self._on is None or self._on.cos.device != device:
            self._on = self.table.to(device, torch.float32)
        return self._on


class StreamingChunkAttention:
    """The current chunk attends to reference + cached history + itself.

    `capture=True` keeps this pass's pre-RoPE K/V per layer in `captured_keys/values`, which the
    caller turns into a `CachedChunk` once the pass is over (the cache is never modified mid-pass).
    """

    def __init__(self, cache: ChunkKVCache, rotary: Rotary3D, capture: bool = False):
        self.cache = cache
        self.views = cache.rotary_views(rotary)
        slot = cache.current_slot()
        self.table = _DeviceTable(rotary.table(cache.geometry.chunk_positions(slot)))
        self.capture = capture
        n = cache.geometry.num_layers
        self.captured_keys: list[torch.Tensor | None] = [None] * n
        self.captured_values: list[torch.Tensor | None] = [None] * n

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.capture:
            self.captured_keys[layer] = k
            self.captured_values[layer] = v
        table = self.table.on(q.device)
        q = apply_rotary(q, table)
        k = apply_rotary(k, table)
        hist_k = self.views.keys[layer]
        if hist_k is not None:
            k = torch.cat([hist_k.to(k.dtype), k], dim=1)
            v = torch.cat([self.views.values[layer].to(v.dtype), v], dim=1)
        return sdpa(q, k, v)


class ReferencePrefillAttention:
    """Reference tokens attend among themselves; their pre-RoPE K/V are captured for the cache."""

    def __init__(self, rotary: Rotary3D, positions: torch.Tensor, num_layers: int):
        self.positions = positions
        self.table = rotary.table(positions)
        self.captured_keys: list[torch.Tensor | None] = [None] * num_layers
        self.captured_values: list[torch.Tensor | None] = [None] * num_layers

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.captured_keys[layer] = k
        self.captured_values[layer] = v
        table = self.table.to(q.device, torch.float32)
        return sdpa(apply_rotary(q, table), apply_rotary(k, table), v)
