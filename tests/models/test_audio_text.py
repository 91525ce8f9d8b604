"""Streaming audio windows, audio feature extractors and the cached text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestage.models.audio import LogMelAudioEncoder, StreamingAudioWindow, Wav2Vec2AudioEncoder
from livestage.models.text import CachedTextEncoder, HashedTextEncoder, stable_token_ids

RATE = 1000  # a small rate keeps the sample-exact checks readable


def _ramp(seconds: int) -> np.ndarray:
    """Sample value = absolute sample index + 1 (so 0 means padding)."""
    return np.arange(1, seconds * RATE + 1, dtype=np.float32)


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_window_for_chunk_k_covers_exactly_k_minus_2_to_k_plus_1_seconds(k):
    w = StreamingAudioWindow(sample_rate=RATE, chunk_seconds=1.0, history_chunks=2)
    w.push(_ramp(10))
    window = w.window(k)
    assert window.shape == (3 * RATE,)
    start = (k - 2) * RATE
    expected = np.array([i + 1 if 0 <= i < 10 * RATE else 0 for i in range(start, start + 3 * RATE)],
                        dtype=np.float32)
    np.testing.assert_array_equal(window, expected)
    assert w.window_bounds(k) == (k - 2.0, k + 1.0)


def test_window_pads_audio_that_has_not_arrived_and_trim_keeps_memory_bounded():
    w = StreamingAudioWindow(sample_rate=RATE)
    w.push(_ramp(3))
    assert w.window(3)[-RATE:].sum() == 0  # chunk 3's own second has not arrived
    np.testing.assert_array_equal(w.window(3)[:RATE], np.arange(RATE + 1, 2 * RATE + 1))
    sizes = []
    for k in range(200):
        w.push(np.ones(RATE, dtype=np.float32))
        w.trim_before(k)
        sizes.append(w._buffer.size)
    # 2 s of history + the 4 s queued ahead of chunk k: constant, whatever the session length
    assert len(set(sizes[5:])) == 1 and sizes[-1] == 6 * RATE
    assert w.window(199)[-1] == 1.0


def test_drop_after_removes_queued_speech():
    w = StreamingAudioWindow(sample_rate=RATE)
    w.push(_ramp(5))
    w.drop_after(2.0)
    assert w.available_seconds == 2.0
    assert w.window(2)[-RATE:].sum() == 0


def test_logmel_features_have_one_vector_per_video_frame_and_follow_the_audio():
    enc = LogMelAudioEncoder(feature_dim=16, fps=24, sample_rate=16000).eval()
    t = torch.arange(3 * 16000) / 16000
    tone = torch.sin(2 * torch.pi * 440 * t)
    with torch.no_grad():
        a = enc.extract(torch.stack([tone, torch.zeros_like(tone)]))
    assert a.shape == (2, 72, 16)
    assert float((a[0] - a[1]).abs().mean()) > 1e-3


def test_wav2vec2_loader_reports_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="wav2vec2 model directory"):
        Wav2Vec2AudioEncoder(tmp_path / "missing", feature_dim=8, fps=24)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Wav2Vec2AudioEncoder(tmp_path, feature_dim=8, fps=24)


def test_text_encoder_pads_with_zeros_is_deterministic_and_cached():
    assert stable_token_ids("Smile please", 1000, 8) == stable_token_ids("smile PLEASE", 1000, 8)
    torch.manual_seed(0)
    enc = HashedTextEncoder(vocab_size=512, text_dim=16, max_tokens=6).eval()
    cached = CachedTextEncoder(enc)
    a = cached.encode(["smile", "look left now"])
    assert a.shape == (2, 6, 16)
    assert torch.all(a[0, 1:] == 0) and torch.any(a[0, 0] != 0)
    assert torch.all(a[1, 3:] == 0)
    b = cached.encode(["smile"])
    assert torch.equal(a[0], b[0]) and cached.hits == 1 and cached.misses == 2
    assert float((a[0, 0] - cached.encode(["nod"])[0, 0]).abs().max()) > 1e-4
    empty = cached.encode([""])
    assert torch.all(empty == 0)


def test_wav2vec2_encoder_loads_real_weights_from_a_directory(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    reference = Wav2Vec2Model(cfg).eval()
    reference.save_pretrained(tmp_path)
    enc = Wav2Vec2AudioEncoder(tmp_path, feature_dim=8, fps=24, layers=[2]).eval()
    audio = torch.randn(1, 3 * 16000)
    with torch.no_grad():
        feats = enc.extract(audio)
        x = (audio - audio.mean(-1, keepdim=True)) / (audio.std(-1, keepdim=True) + 1e-7)
        hidden = reference(x, output_hidden_states=True).hidden_states[2]
        ours = enc.backbone(x, output_hidden_states=True).hidden_states[2]
    assert feats.shape == (1, 72, 8)
    assert torch.allclose(ours, hidden, atol=1e-5)  # the saved weights, not a fresh init
