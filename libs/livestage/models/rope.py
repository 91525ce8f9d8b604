"""3D rotary position embedding split over (time, height, width), Wan2.1 layout.

Each attention head of size `d` holds d/2 rotation pairs (adjacent elements). The pairs are split
into a temporal part of `c - 2*(c//3)` pairs and height/width parts of `c//3` pairs each
(c = d/2); axis `a` with `n_a` pairs rotates pair i by `pos_a / theta**(i / n_a)`. Positions are
explicit integer triples per token, which is what lets the streaming cache store keys *before*
RoPE and rotate them at read time with positions relative to the current attention window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs given to the t, h and w axes."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def axis_inv_freq(head_dim: int, theta: float = 10000.0) -> list[torch.Tensor]:
    """Inverse frequencies per axis (float64), as the reference's per-axis `rope_params`."""
    out = []
    for pairs in axis_pairs(head_dim):
        out.append(1.0 / torch.pow(theta, torch.arange(pairs, dtype=torch.float64) / pairs))
    return out


@dataclass
class RotaryTable:
    """cos/sin of every pair for a set of token positions, ready to rotate q or k."""

    cos: torch.Tensor  # [L, 1, d/2]
    sin: torch.Tensor  # [L, 1, d/2]

    def to(self, device: torch.device, dtype: torch.dtype) -> "RotaryTable":
        return RotaryTable(self.cos.to(device, dtype), self.sin.to(device, dtype))


class Rotary3D:
    """Builds rotary tables for explicit (t, h, w) integer positions.

    `max_positions` mirrors the finite table of the reference implementation: a position on any
    axis beyond it is an error, never a silent wrap. The streaming cache keeps temporal positions
    inside the attention window, so they stay small however long a session runs.
    """

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0):
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.inv_freq = axis_inv_freq(head_dim, theta)

    def table(self, positions: torch.Tensor) -> RotaryTable:
        """positions: int tensor [L, 3] of (t, h, w) -> table for L tokens (float64 angles)."""
        if positions.numel() and (positions.max() >= self.max_positions or positions.min() < 0):
            raise ValueError(
                f"RoPE position out of range [0, {self.max_positions}): "
                f"min {int(positions.min())}, max {int(positions.max())}"
            )
        pos = positions.to(torch.float64)
        angles = torch.cat(
            [pos[:, axis : axis + 1] * self.inv_freq[axis][None, :] for axis in range(3)], dim=1
        )
        return RotaryTable(torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :])


def apply_rotary(x: torch.Tensor, table: RotaryTable) -> torch.Tensor:
    """Rotates adjacent pairs of `x` [B, L, heads, d] by the table [L, 1, d/2]."""
    cos = table.cos.to(x.dtype)
    sin = table.sin.to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)


def grid_positions(frames: int, height: int, width: int, t_offset: int = 0) -> torch.Tensor:
    """(t, h, w) positions of a frames x height x width token grid in raster order, [L, 3]."""
    t = torch.arange(frames) + t_offset
    h = torch.arange(height)
    w = torch.arange(width)
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)
