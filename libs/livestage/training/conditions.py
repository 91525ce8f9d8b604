"""Batches of training conditions drawn from the latent dataset, shaped as the DiT takes them.

A `Window` names `chunks` consecutive chunks of one clip. `ConditionBuilder` turns a list of
windows into the latents, the speak/listen audio features of the windows (2 s of history plus the
window, exactly the streaming audio window when chunks=1), the text directive features and the
identity's reference latents. The audio and text encoders are the shipped ones: trained with the
teacher, frozen afterwards.

Which reference images a batch gets varies (the global portrait always; views and expressions
often), because a product backend may send only a portrait.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from livestage.models.config import ModelPreset
from livestage.models.text import HashedTextEncoder
from livestage.training.dataset import REFERENCE_LAYOUT, LatentDataset


@dataclass(frozen=True)
class Window:
    clip: int
    first_chunk: int
    chunks: int


def reference_subset(rng: np.random.Generator, full_prob: float = 0.6) -> list[int]:
    """Indices into `REFERENCE_LAYOUT`: all six images, or the global portrait alone."""
    return list(range(len(REFERENCE_LAYOUT))) if rng.random() < full_prob else [0]


class ConditionBuilder:
    def __init__(self, data: LatentDataset, preset: ModelPreset, audio_encoder: nn.Module,
                 text_encoder: HashedTextEncoder):
        self.data = data
        self.preset = preset
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder

    def sample_windows(self, rng: np.random.Generator, batch: int, chunks: int,
                       clips: list[int] | None = None) -> list[Window]:
        pool = clips if clips is not None else list(range(len(self.data.identity)))
        total = self.data.chunks
        return [Window(int(pool[int(rng.integers(len(pool)))]), int(rng.integers(0, total - chunks + 1)), chunks)
                for _ in range(batch)]

    def latents(self, windows: list[Window]) -> torch.Tensor:
        return torch.stack([self.data.chunk_latents(w.clip, w.first_chunk, w.chunks) for w in windows])

    def behaviour(self, windows: list[Window]) -> torch.Tensor:
        """[B, latent frames] nod-or-smile strength of each window's latent frames (0..1)."""
        return torch.stack([self.data.chunk_behaviour(w.clip, w.first_chunk, w.chunks) for w in windows])

    def audio_windows(self, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw audio [B, samples] of the speak and listen windows."""
        hist = self.preset.chunk.audio_history_chunks
        pairs = [self.data.audio_windows(w.clip, w.first_chunk, w.chunks, hist) for w in windows]
        return (torch.from_numpy(np.stack([p[0] for p in pairs])),
                torch.from_numpy(np.stack([p[1] for p in pairs])))

    def audio_features(self, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
        speak, listen = self.audio_windows(windows)
        feats = self.audio_encoder.extract(torch.cat([speak, listen]))
        b = len(windows)
        return feats[:b], feats[b:]

    def directives(self, windows: list[Window]) -> list[str]:
        """The directive holding in each window's last chunk (the one a continuation generates)."""
        return [self.data.directives[w.clip][w.first_chunk + w.chunks - 1] for w in windows]

    def directive_varies(self, w: Window) -> bool:
        texts = self.data.directives[w.clip][w.first_chunk:w.first_chunk + w.chunks]
        return len(set(texts)) > 1

    def text(self, texts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(texts)

    def references(self, windows: list[Window], subset: list[int]) -> list[tuple[str, torch.Tensor]]:
        """(kind, latent [B, z, 1, h, w]) for each chosen reference image of each window's identity."""
        ids = [self.data.identity[w.clip] for w in windows]
        refs = self.data.references[ids]  # [B, 6, z, 1, h, w]
        return [(REFERENCE_LAYOUT[j][0], refs[:, j]) for j in subset]
