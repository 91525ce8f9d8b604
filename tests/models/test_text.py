"""The hashed text encoder (stable across processes, zero-padded) and the LRU-cached wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata

import pytest
import torch

from livestage.models.text import CachedTextEncoder, HashedTextEncoder, stable_token_ids

_PROBE = """
import sys, torch
from livestage.models.text import HashedTextEncoder, stable_token_ids
print(stable_token_ids("Smile, please!", 4096, 8), stable_token_ids("look LEFT now", 4096, 8))
torch.manual_seed(0)
enc = HashedTextEncoder(vocab_size=512, text_dim=16, max_tokens=6).eval()
with torch.no_grad():
    print(repr(enc.encode(["nod twice"]).double().sum().item()))
"""


def _encoder(seed: int = 0) -> HashedTextEncoder:
    torch.manual_seed(seed)
    return HashedTextEncoder(vocab_size=512, text_dim=16, max_tokens=6).eval()


def test_token_ids_are_stable_case_insensitive_and_unicode_aware():
    # Golden values: a change here silently re-maps every word of every trained checkpoint.
    assert stable_token_ids("Smile, please!", 4096, 8) == [2011, 3824]
    assert stable_token_ids("look LEFT now", 4096, 8) == [1915, 1567, 1447]
    assert stable_token_ids("SMILE please", 4096, 8) == stable_token_ids("smile, please!", 4096, 8)
    assert stable_token_ids("one two three four", 4096, 2) == stable_token_ids("one two", 4096, 8)
    assert len(stable_token_ids("улыбнись и кивни", 4096, 8)) == 3
    decomposed = unicodedata.normalize("NFD", "sonríe")
    assert decomposed != "sonríe" and stable_token_ids(decomposed, 4096, 8) == stable_token_ids("sonríe", 4096, 8)
    assert stable_token_ids("  ...  ", 4096, 8) == []
    assert all(1 <= i < 4096 for i in stable_token_ids("a b c d e f g h", 4096, 8))


def test_encoding_is_identical_in_another_process_with_another_hash_seed():
    torch.manual_seed(0)
    enc = HashedTextEncoder(vocab_size=512, text_dim=16, max_tokens=6).eval()
    with torch.no_grad():
        here = repr(enc.encode(["nod twice"]).double().sum().item())
    ids = f"{stable_token_ids('Smile, please!', 4096, 8)} {stable_token_ids('look LEFT now', 4096, 8)}"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [ids, here]


def test_output_shape_and_zero_padding_after_the_last_word():
    enc = _encoder()
    with torch.no_grad():
        out = enc.encode(["smile", "look left now", "one two three four five six seven eight", ""])
    assert out.shape == (4, 6, 16)
    assert torch.all(out[0, 1:] == 0) and torch.any(out[0, 0] != 0)
    assert torch.all(out[1, 3:] == 0) and torch.all(out[1, :3].abs().sum(-1) > 0)
    assert torch.all(out[2].abs().sum(-1) > 0)  # truncated to max_tokens, no padding
    assert torch.all(out[3] == 0)  # empty directive: all padding
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("smile")  # type: ignore[arg-type]


def test_encoding_depends_on_the_words_and_the_weights():
    enc = _encoder()
    with torch.no_grad():
        smile, nod, smile_again = enc.encode(["smile", "nod", "Smile!"])
        other = _encoder(seed=1).encode(["smile"])[0]
    assert torch.equal(smile, smile_again)
    assert float((smile[0] - nod[0]).abs().max()) > 1e-3
    assert float((smile[0] - other[0]).abs().max()) > 1e-3


class _CountingEncoder:
    """A stand-in `TextEncoder` that records what it was asked to encode."""

    text_dim = 4
    max_tokens = 3

    def __init__(self) -> None:
        self.calls: list[str] = []

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls.extend(texts)
        return torch.stack([torch.full((3, 4), float(len(t))) for t in texts])


def test_cache_counts_hits_and_misses_and_returns_the_same_encoding():
    cached = CachedTextEncoder(_encoder())
    a = cached.encode(["smile", "look left now"])
    b = cached.encode(["smile"])
    assert torch.equal(a[0], b[0]) and (cached.hits, cached.misses) == (1, 2)
    with torch.no_grad():
        assert torch.equal(a, cached.encoder.encode(["smile", "look left now"]))
    b.zero_()  # callers own what they get back: the cached row survives
    assert torch.equal(cached.encode(["smile"])[0], a[0]) and cached.hits == 2
    assert cached.text_dim == 16 and cached.max_tokens == 6
    assert cached.encode([]).shape == (0, 6, 16)


def test_cache_is_a_bounded_lru_over_any_text_encoder():
    inner = _CountingEncoder()
    cached = CachedTextEncoder(inner, max_entries=2)
    cached.encode(["a", "bb"])
    cached.encode(["a"])  # "a" becomes most recently used
    cached.encode(["ccc"])  # evicts "bb", the least recently used
    assert len(cached) == 2
    cached.encode(["a", "ccc"])
    assert inner.calls == ["a", "bb", "ccc"] and (cached.hits, cached.misses) == (3, 3)
    cached.encode(["bb"])
    assert inner.calls[-1] == "bb" and cached.misses == 4
    cached.clear()
    assert len(cached) == 0
    out = cached.encode(["a", "a"])  # a repeat inside one call is a hit
    assert out.shape == (2, 3, 4) and inner.calls[-1] == "a" and inner.calls.count("a") == 2
    with pytest.raises(ValueError, match="max_entries"):
        CachedTextEncoder(inner, max_entries=0)
