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
import unicodedata
from collections import OrderedDict
from typing import Protocol

import torch
import torch.nn as nn

# Letters and digits of any script (plus apostrophes), so "sonríe" or "улыбнись" are words too;
# for ASCII text this is exactly [a-z0-9']+ after lower-casing, which keeps existing token ids.
_WORD = re.compile(r"(?:[^\W_]|')+")


class TextEncoder(Protocol):
    """Directive texts to the DiT's text-condition tokens (Wan pads to `text_len` with zeros)."""

    text_dim: int
    max_tokens: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Texts -> features [B, max_tokens, text_dim], zero-padded after the last word."""
        ...


def stable_token_ids(text: str, vocab_size: int, max_tokens: int) -> list[int]:
    """Lower-cased words hashed into [1, vocab_size) (0 is padding), at most `max_tokens`.

    blake2b rather than Python's `hash`, which is salted per process: the same word must map to
    the same embedding row in every worker and after every restart, or checkpoints mean nothing.
    """
    if vocab_size < 2:
        raise ValueError("vocab_size must be at least 2 (id 0 is padding)")
    ids = []
    # NFKC first: a decomposed "i" + combining accent and a precomposed "í" are the same word.
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower())[:max_tokens]:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        ids.append(1 + int.from_bytes(digest, "little") % (vocab_size - 1))
    return ids


class HashedTextEncoder(nn.Module):
    """Hashed word embeddings + positions + one transformer layer.

    Small enough to run anywhere; hash collisions are tolerated (directives are short and few).
    Words beyond `max_tokens` are dropped. Output rows after the last word are exactly zero.
    """

    def __init__(self, vocab_size: int, text_dim: int, max_tokens: int, num_heads: int = 4):
        super().__init__()
        if max_tokens < 1 or text_dim < 1:
            raise ValueError("max_tokens and text_dim must be positive")
        self.vocab_size = vocab_size
        self.text_dim = text_dim
        self.max_tokens = max_tokens
        self.embedding = nn.Embedding(vocab_size, text_dim, padding_idx=0)
        self.position = nn.Embedding(max_tokens, text_dim)
        heads = num_heads if text_dim % num_heads == 0 else 1
        self.mixer = nn.TransformerEncoderLayer(text_dim, heads, dim_feedforward=2 * text_dim,
                                                dropout=0.0, batch_first=True, norm_first=True)

    def token_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, max_tokens] (0 = padding) and the mask of real tokens."""
        _check_texts(texts)
        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        for i, text in enumerate(texts):
            row = stable_token_ids(text, self.vocab_size, self.max_tokens)
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Texts -> [B, max_tokens, text_dim], zero after each text's last word."""
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


def _check_texts(texts: list[str]) -> None:
    # A bare string is iterable too: without this, "smile" would encode as 5 one-letter texts.
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")


class CachedTextEncoder:
    """Any `TextEncoder` with a bounded LRU cache keyed by the text.

    Directives are re-sent with every chunk but change rarely, so nearly every call is a hit.
    Cached rows are computed one text at a time so that a text's encoding never depends on what
    else was in the batch. `hits` / `misses` count texts, for metrics. Call `clear()` after
    changing the wrapped encoder's weights.
    """

    def __init__(self, encoder: TextEncoder, max_entries: int = 256):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
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

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Forgets every cached encoding (the counters are kept)."""
        self._cache.clear()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Like the wrapped encoder's `encode`; returns a fresh tensor (the cache stays intact)."""
        _check_texts(texts)
        if not texts:
            return torch.zeros(0, self.max_tokens, self.text_dim)
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

    def to(self, *args: object, **kwargs: object) -> "CachedTextEncoder":
        """Moves the wrapped encoder; cached rows were on the old device/dtype, so they go."""
        self.encoder.to(*args, **kwargs)  # type: ignore[attr-defined]
        self._cache.clear()
        return self
