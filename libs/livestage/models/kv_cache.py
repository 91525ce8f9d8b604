"""The per-session history cache of the causal DiT: 3 sink chunks + a sliding window of 2 chunks.

Keys are stored **before RoPE**. At read time every cached chunk is rotated with the temporal
position it has inside the current attention window (sinks first, then the window, then the
current chunk), so positions never grow with session length and a session can run for hours.
Memory is bounded by `max_bytes()`: at most `sink_chunks + window_chunks` chunks of K/V per layer,
plus the reference-image tokens.

Each cached chunk also keeps the latent it was computed from and the timestep it was computed
at: that is the persistent visual state a new worker needs to rebuild the cache after failover.
Two roles use this class: the backbone's `NoisyHistoryCache` (history K/V from re-noised latents)
and the refiner's `CleanHistoryCache` (history K/V from clean refined latents).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from livestage.models.rope import Rotary3D, RotaryTable, apply_rotary, grid_positions


@dataclass
class CachedChunk:
    """K/V of one chunk for every layer (pre-RoPE), and the latent they came from."""

    chunk_index: int
    keys: list[torch.Tensor]  # per layer [B, T, heads, head_dim]
    values: list[torch.Tensor]
    latent: torch.Tensor  # [B, C, F, h, w], the model input the K/V were computed from
    timestep: float

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class ReferenceKV:
    """K/V of the reference-image tokens (pre-RoPE) and their fixed (t, h, w) positions."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [R, 3]
    kinds: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class CacheGeometry:
    """Shapes the cache needs to place chunks on the RoPE grid and to bound its memory."""

    num_layers: int
    num_heads: int
    head_dim: int
    latent_frames_per_chunk: int
    grid_height: int  # tokens per latent frame = grid_height * grid_width
    grid_width: int
    sink_chunks: int = 3
    window_chunks: int = 2
    rollback_chunks: int = 0
    """Evicted window chunks kept aside so an interrupt can roll generation back this far."""

    @property
    def tokens_per_chunk(self) -> int:
        return self.latent_frames_per_chunk * self.grid_height * self.grid_width

    @property
    def max_cached_chunks(self) -> int:
        return self.sink_chunks + self.window_chunks

    def chunk_positions(self, slot: int) -> torch.Tensor:
        """(t, h, w) positions of a chunk sitting at `slot` of the attention window."""
        f = self.latent_frames_per_chunk
        return grid_positions(f, self.grid_height, self.grid_width, t_offset=slot * f)

    @property
    def reference_t_origin(self) -> int:
        """Temporal position right after the longest possible window (history + current)."""
        return (self.max_cached_chunks + 1) * self.latent_frames_per_chunk


class ChunkKVCache:
    """Sink + sliding-window history of one session for one model (backbone or refiner)."""

    role = "history"

    def __init__(self, geometry: CacheGeometry):
        self.geometry = geometry
        self.sinks: list[CachedChunk] = []
        self._recent: deque[CachedChunk] = deque(
            maxlen=geometry.window_chunks + geometry.rollback_chunks
        )
        self.reference: ReferenceKV | None = None
        self._version = 0
        self._view: tuple[tuple[int, bool], RotaryViews] | None = None

    # -- content ---------------------------------------------------------------------------
    def append(self, chunk: CachedChunk) -> None:
        """Adds a finished chunk: the first `sink_chunks` become sinks, later ones slide."""
        if len(self.sinks) < self.geometry.sink_chunks:
            self.sinks.append(chunk)
        elif self._recent.maxlen:
            self._recent.append(chunk)  # deque(maxlen) drops the oldest
        self._version += 1

    @property
    def window(self) -> list[CachedChunk]:
        """The sliding window: the newest `window_chunks` non-sink chunks, oldest first."""
        n = self.geometry.window_chunks
        return list(self._recent)[-n:] if n else []

    def set_reference(self, reference: ReferenceKV | None) -> None:
        self.reference = reference
        self._version += 1

    def history(self) -> list[CachedChunk]:
        """Cached chunks in attention order: sinks, then the window oldest first."""
        return [*self.sinks, *self.window]

    def retained(self) -> list[CachedChunk]:
        """Every chunk held: sinks, window and the rollback reserve."""
        return [*self.sinks, *self._recent]

    @property
    def num_chunks(self) -> int:
        return len(self.sinks) + len(self.window)

    @property
    def last_chunk_index(self) -> int | None:
        hist = self.history()
        return hist[-1].chunk_index if hist else None

    def clear(self) -> None:
        self.sinks.clear()
        self._recent.clear()
        self.reference = None
        self._version += 1

    def truncate_after(self, chunk_index: int) -> None:
        """Forgets chunks newer than `chunk_index`: an interrupt discards generation lookahead.

        Window chunks evicted by the discarded ones come back from the rollback reserve, so the
        window is what it was when `chunk_index` was the newest chunk (up to `rollback_chunks`).
        """
        while self._recent and self._recent[-1].chunk_index > chunk_index:
            self._recent.pop()
        while self.sinks and not self._recent and self.sinks[-1].chunk_index > chunk_index:
            self.sinks.pop()
        self._version += 1

    # -- memory ----------------------------------------------------------------------------
    def nbytes(self) -> int:
        total = sum(c.nbytes() for c in self.retained())
        if self.reference is not None:
            total += self.reference.nbytes()
        return total

    def max_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32,
                  reference_tokens: int = 0) -> int:
        """Upper bound of `nbytes()` whatever the session length."""
        g = self.geometry
        per_token = 2 * g.num_layers * g.num_heads * g.head_dim * torch.finfo(dtype).bits // 8
        chunks = g.max_cached_chunks + g.rollback_chunks
        return batch * per_token * (chunks * g.tokens_per_chunk + reference_tokens)

    # -- reading -----------------------------------------------------------------------------
    def current_slot(self) -> int:
        """Window slot of the chunk being generated now (right after the cached history)."""
        return self.num_chunks

    def rotary_views(self, rotary: Rotary3D) -> "RotaryViews":
        """History (and reference) keys rotated for the current window, memoised until it changes.

        The backbone runs two denoising steps per chunk against the same history: rotating the
        cached keys once per chunk instead of once per step halves that work.
        """
        # Keyed by grad mode too: views built without autograd must not be reused by a pass that
        # trains through the reference tokens (training runs both kinds against one cache).
        key = (self._version, torch.is_grad_enabled())
        if self._view is not None and self._view[0] == key:
            return self._view[1]
        view = RotaryViews.build(self, rotary)
        self._view = (key, view)
        return view


@dataclass
class RotaryViews:
    """Per layer: reference + history keys after RoPE, and the matching values."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @classmethod
    def build(cls, cache: ChunkKVCache, rotary: Rotary3D) -> "RotaryViews":
        g = cache.geometry
        parts_pos: list[torch.Tensor] = []
        ref = cache.reference
        if ref is not None:
            parts_pos.append(ref.positions)
        hist = cache.history()
        for slot, _ in enumerate(hist):
            parts_pos.append(g.chunk_positions(slot))
        if not parts_pos:
            return cls([None] * g.num_layers, [None] * g.num_layers)
        table: RotaryTable = rotary.table(torch.cat(parts_pos))
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        for layer in range(g.num_layers):
            k_parts = ([ref.keys[layer]] if ref is not None else []) + [c.keys[layer] for c in hist]
            v_parts = ([ref.values[layer]] if ref is not None else []) + [c.values[layer] for c in hist]
            k = torch.cat(k_parts, dim=1)
            keys.append(apply_rotary(k, table.to(k.device, torch.float32)).to(k.dtype))
            values.append(torch.cat(v_parts, dim=1))
        return cls(keys, values)


class NoisyHistoryCache(ChunkKVCache):
    """The backbone's cache: history K/V computed from re-noised history latents."""

    role = "noisy"


class CleanHistoryCache(ChunkKVCache):
    """The refiner's cache: history K/V computed from clean refined latents."""

    role = "clean"
