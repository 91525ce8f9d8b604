"""Text directive encoding behind one interface, cached by text.

Directives ("smile", "nod", "look left", a persona line) are re-sent every chunk but change
rarely, so `CachedTextEncoder` keeps the last encodings keyed by the text. The built-in
`HashedTextEncoder` is small and runs anywhere: words are hashed with a stable hash (blake2b,
not Python's salted `hash`) into an embedding table, given positions and mixed by one transformer
layer. Larger encoders (umT5, MiniLM) plug in behind `TextEncoder`.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from typing import Protocol

import torch
import torch.nn as nn

_WORD = re.compile(r"[a-z0-9']+")


class TextEncoder(Protocol):
    text_dim: int
    max_tokens: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Texts -> features [B, max_tokens, text_dim], zero-padded after the last word."""
        ...


def stable_token_ids(text: str, vocab_size: int, max_tokens: int) -> list[int]:
    """Lower-cased words hashed into [1, vocab_size) (0 is padding), at most `max_tokens`."""
    ids = []
    for word in _WORD.findall(text.lower())[:max_tokens]:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        ids.append(1 + int.from_bytes(digest, "little") % (vocab_size - 1))
    return ids


class HashedTextEncoder(nn.Module):
    """Hashed word embeddings + positions + one transformer layer."""

    def __init__(self, vocab_size: int, text_dim: int, max_tokens: int, num_heads: int = 4):
        super().__init__()
        self.vocab_size = vocab_size
        self.text_dim = text_dim
        self.max_tokens = max_tokens
        self.embedding = nn.Embedding(vocab_size, text_dim, padding_idx=0)
        self.position = nn.Embedding(max_tokens, text_dim)
        heads = num_heads if text_dim % num_heads == 0 else 1
        self.mixer = nn.TransformerEncoderLayer(text_dim, heads, dim_feedforward=2 * text_dim,
                                                dropout=0.0, batch_first=True, norm_first=True)

    def token_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        for i, text in enumerate(texts):
            row = stable_token_ids(text, self.vocab_size, self.max_tokens)
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids, valid = self.token_ids(texts)
        ids = ids.to(self.embedding.weight.device)
        valid = valid.to(ids.device)
        pos = torch.arange(self.max_tokens, device=ids.device)
        x = self.embedding(ids) + self.position(pos)[None]
        # An empty text has no tokens: keep one position attendable so attention stays finite,
        # then zero everything that is padding (the DiT pads with zeros too).
        mask = ~valid.clone()
        mask[:, 0] = False
        x = self.mixer(x, src_key_padding_mask=mask)
        return x * valid.unsqueeze(-1).to(x.dtype)

    forward = encode


class CachedTextEncoder:
    """Any `TextEncoder` with a bounded LRU cache keyed by the text."""

    def __init__(self, encoder: TextEncoder, max_entries: int = 256):
        self.encoder = encoder
        self.max_entries = max_entries
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def text_dim(self) -> int:
        return self.encoder.text_dim

    @property
    def max_tokens(self) -> int:
        return self.encoder.max_tokens

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            cached = self._cache.get(text)
            if cached is None:
                self.misses += 1
                cached = self.encoder.encode([text])[0]
                self._cache[text] = cached
                if len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
            else:
                self.hits += 1
                self._cache.move_to_end(text)
            rows.append(cached)
        return torch.stack(rows)

    def to(self, *args, **kwargs) -> "CachedTextEncoder":
        self.encoder.to(*args, **kwargs)  # type: ignore[attr-defined]
        self._cache.clear()
        return self
