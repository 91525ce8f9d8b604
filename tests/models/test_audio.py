"""Streaming audio windows, the log-mel and wav2vec2 extractors, and the per-chunk conditioner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestage.models.audio import (
    AudioConditioner,
    LogMelAudioEncoder,
    StreamingAudioWindow,
    Wav2Vec2AudioEncoder,
)
from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.models.weights import seeded_init

RATE = 16000


def _ramp(seconds: float, rate: int = RATE) -> np.ndarray:
    """Sample value = absolute sample index + 1, so 0 can only mean padding (exact in float32)."""
    return np.arange(1, int(seconds * rate) + 1, dtype=np.float32)


def _expected(start: int, length: int, available: int) -> np.ndarray:
    idx = np.arange(start, start + length)
    return np.where((idx >= 0) & (idx < available), idx + 1, 0).astype(np.float32)


# -- StreamingAudioWindow ------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_window_for_chunk_k_covers_exactly_k_minus_2_to_k_plus_1_seconds(k):
    w = StreamingAudioWindow(sample_rate=RATE)
    w.push(_ramp(10))
    window = w.window(k)
    assert window.dtype == np.float32 and window.shape == (3 * RATE,)
    np.testing.assert_array_equal(window, _expected((k - 2) * RATE, 3 * RATE, 10 * RATE))
    assert w.window_bounds(k) == (k - 2.0, k + 1.0)
    if k < 2:  # zero padding before t = 0, then sample 0 exactly where t = 0 falls
        assert not window[:(2 - k) * RATE].any() and window[(2 - k) * RATE] == 1.0
    assert torch.equal(w.window_tensor(k), torch.from_numpy(window))
    np.testing.assert_array_equal(w.chunk_audio(k), _expected(k * RATE, RATE, 10 * RATE))


def test_window_zero_pads_audio_that_has_not_arrived_yet():
    w = StreamingAudioWindow(sample_rate=RATE)
    w.push(_ramp(3.5))
    window = w.window(3)  # [1, 4) s: 2.5 s known, then 0.5 s missing
    np.testing.assert_array_equal(window[:int(2.5 * RATE)], np.arange(RATE + 1, int(3.5 * RATE) + 1))
    assert not window[int(2.5 * RATE):].any()
    assert not w.window(20).any()


def test_window_honours_chunk_length_and_history_settings():
    w = StreamingAudioWindow(sample_rate=1000, chunk_seconds=0.5, history_chunks=3)
    w.push(_ramp(10, 1000))
    assert w.window_samples == 2000
    assert w.window_bounds(4) == (0.5, 2.5)
    np.testing.assert_array_equal(w.window(4), _expected(500, 2000, 10000))


def test_many_small_pushes_equal_one_push_and_int16_pcm_is_scaled():
    whole, pieces = StreamingAudioWindow(RATE), StreamingAudioWindow(RATE)
    ramp = _ramp(4)
    whole.push(ramp)
    for start in range(0, ramp.size, 320):  # 20 ms frames, as from a WebRTC track
        pieces.push(torch.from_numpy(ramp[start:start + 320]))
    assert pieces.available_seconds == 4.0
    for k in range(6):
        np.testing.assert_array_equal(pieces.window(k), whole.window(k))
    pcm = StreamingAudioWindow(RATE)
    pcm.push(np.array([16384, -32768, 32767], dtype=np.int16))
    np.testing.assert_allclose(pcm.window(2)[:3], [0.5, -1.0, 32767 / 32768])
    with pytest.raises(ValueError, match="mono"):
        pcm.push(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        pcm.push(np.array([0.0, np.nan], np.float32))


def test_trim_keeps_memory_bounded_and_windows_exact():
    w = StreamingAudioWindow(sample_rate=RATE)
    reference = StreamingAudioWindow(sample_rate=RATE)
    w.push(_ramp(4))  # 4 s queued ahead, as a TTS reply arriving faster than real time
    reference.push(_ramp(4))
    sizes = []
    for k in range(300):
        second = np.arange((k + 4) * RATE + 1, (k + 5) * RATE + 1, dtype=np.float32)  # same ramp
        w.push(second)
        if k < 40:
            reference.push(second)
        w.trim_before(k)
        sizes.append(w.buffered_samples)
        if k < 36:
            for j in (k, k + 1):  # every window still needed is untouched by the trim
                np.testing.assert_array_equal(w.window(j), reference.window(j))
    # 2 s of history + 5 s queued ahead of chunk k: constant whatever the session length
    assert set(sizes[3:]) == {7 * RATE}
    assert w.available_seconds == 304.0
    np.testing.assert_array_equal(w.window(299), _expected(297 * RATE, 3 * RATE, 304 * RATE))


def test_drop_after_removes_queued_speech_and_pad_to_realigns_the_timeline():
    w = StreamingAudioWindow(sample_rate=RATE)
    w.push(_ramp(5))
    w.drop_after(2.0)
    assert w.available_seconds == 2.0
    assert not w.window(2)[-RATE:].any()
    np.testing.assert_array_equal(w.window(1), _expected(-RATE, 3 * RATE, 2 * RATE))
    w.drop_after(3.0)  # nothing beyond 3 s: no-op
    assert w.available_seconds == 2.0
    w.pad_to(4.0)  # the stream was quiet until 4 s: the next speech starts there
    w.push(np.full(RATE, 0.5, np.float32))
    window = w.window(4)  # [2, 5) s: silence, silence, speech
    assert not window[:2 * RATE].any() and np.all(window[2 * RATE:] == 0.5)


# -- LogMelAudioEncoder ---------------------------------------------------------------------------

def _tone(seconds: float, hz: float) -> torch.Tensor:
    t = torch.arange(int(seconds * RATE)) / RATE
    return 0.5 * torch.sin(2 * torch.pi * hz * t)


@pytest.mark.parametrize("fps,seconds,frames", [(24, 3.0, 72), (25, 3.0, 75), (24, 2.0, 48)])
def test_logmel_gives_one_vector_per_video_frame(fps, seconds, frames):
    enc = LogMelAudioEncoder(feature_dim=64, fps=fps).eval()
    with torch.no_grad():
        out = enc.extract(torch.zeros(2, int(seconds * RATE)))
        single = enc.extract(torch.zeros(int(seconds * RATE)))
    assert out.shape == (2, frames, 64) and single.shape == (1, frames, 64)
    assert torch.isfinite(out).all()


def test_logmel_features_follow_the_audio_in_time():
    torch.manual_seed(0)
    enc = LogMelAudioEncoder(feature_dim=32, fps=24).eval()
    silence = torch.zeros(3 * RATE)
    burst = silence.clone()
    burst[2 * RATE:int(2.5 * RATE)] = _tone(0.5, 440)  # sound only in [2.0, 2.5) s
    other = silence.clone()
    other[2 * RATE:int(2.5 * RATE)] = _tone(0.5, 3000)
    with torch.no_grad():
        a, b, c = enc.extract(torch.stack([silence, burst, other]))
    diff = (a - b).abs().amax(-1)  # per video frame
    assert torch.all(diff[:44] < 1e-5), "frames well before 2 s must not see the burst"
    assert torch.all(diff[49:59] > 1e-2), "frames inside the burst must change"
    assert torch.all(diff[66:] < 1e-5), "frames well after 2.5 s must not see the burst"
    assert float((b[50:58] - c[50:58]).abs().mean()) > 1e-2  # pitch matters, not just loudness


def test_logmel_is_deterministic_for_a_seed_with_stable_parameter_names():
    x = torch.randn(1, 3 * RATE, generator=torch.Generator().manual_seed(1))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        enc = LogMelAudioEncoder(feature_dim=16, fps=24).eval()
        with torch.no_grad():
            outs.append(enc.extract(x))
    assert torch.equal(outs[0], outs[1])
    assert set(enc.state_dict()) == {"norm.weight", "norm.bias", "temporal.weight", "temporal.bias",
                                     "proj.weight", "proj.bias"}
    torch.manual_seed(8)
    with torch.no_grad():
        assert not torch.allclose(LogMelAudioEncoder(16, 24).eval().extract(x), outs[0])


def test_loudness_envelopes_are_causal_and_remember_speech_that_just_ended():
    enc = LogMelAudioEncoder(feature_dim=16, fps=24, envelope_seconds=(0.1, 0.4, 2.0)).eval()
    rng = torch.Generator().manual_seed(0)
    talk = torch.zeros(3 * RATE)
    talk[int(0.5 * RATE):int(1.8 * RATE)] = 0.1 * torch.randn(int(1.3 * RATE), generator=rng)  # user stops at 1.8 s
    later = talk.clone()
    later[int(2.6 * RATE):] = 0.1 * torch.randn(int(0.4 * RATE), generator=rng)  # more speech from 2.6 s
    with torch.no_grad():
        env = enc.loudness_envelopes(enc.mel_power(torch.stack([torch.zeros(3 * RATE), talk, later])))
    silence, after, changed = env  # [T at 100 Hz, 3]
    assert torch.allclose(silence, silence[0].expand_as(silence))  # silence: flat, all equal
    assert torch.equal(after[:255], changed[:255])  # frames before 2.55 s cannot hear 2.6 s
    pause = after[240]  # 0.6 s into the pause: the fast envelope fell, the slow ones still remember
    assert pause[0] < pause[1] < pause[2]
    assert float(pause[0] - silence[240, 0]) < 0.5 * float(after[170, 0] - silence[170, 0])
    assert float(pause[2] - silence[240, 2]) > 0.8 * float(after[170, 2] - silence[170, 2])


def test_logmel_with_envelopes_widens_only_the_temporal_input_and_checks_its_time_constants():
    plain, with_env = LogMelAudioEncoder(16, 24), LogMelAudioEncoder(16, 24, envelope_seconds=(0.1, 1.0))
    assert tuple(plain.temporal.weight.shape) == (16, 80, 5)
    assert tuple(with_env.temporal.weight.shape) == (16, 82, 5)
    assert set(with_env.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        assert with_env.extract(torch.zeros(3 * RATE)).shape == (1, 72, 16)
    with pytest.raises(RuntimeError, match="temporal.weight"):
        with_env.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="envelope_seconds"):
        LogMelAudioEncoder(16, 24, envelope_seconds=(0.0,))


def test_the_preset_decides_the_envelopes_of_the_built_in_extractor():
    tiny = get_preset("tiny")
    assert tiny.audio_envelope_seconds  # the test preset exercises them
    for preset, channels in ((tiny, 80 + len(tiny.audio_envelope_seconds)),
                             (tiny.replace(audio_envelope_seconds=()), 80)):
        enc = build_models(preset, allow_seeded=True).audio_encoder
        assert enc.temporal.in_channels == channels
        assert enc.envelope_seconds == preset.audio_envelope_seconds


# -- AudioConditioner -----------------------------------------------------------------------------

def test_conditioner_returns_whole_window_features_and_the_current_chunk_range():
    torch.manual_seed(0)
    enc = LogMelAudioEncoder(feature_dim=8, fps=24).eval()
    cond = AudioConditioner(enc)
    speak, listen = StreamingAudioWindow(RATE), StreamingAudioWindow(RATE)
    speak.push(_tone(6, 220).numpy())
    listen.push(_tone(6, 880).numpy() * 0.3)
    with torch.no_grad():
        feats = cond.for_chunk(4, speak, listen)
        alone_speak = enc.extract(speak.window_tensor(4))
        alone_listen = enc.extract(listen.window_tensor(4))
    assert feats.speak.shape == feats.listen.shape == (1, 72, 8)
    assert feats.current == range(48, 72)
    assert feats.speak_current.shape == (1, 24, 8)
    assert float((feats.speak - alone_speak).abs().max()) < 1e-5
    assert float((feats.listen - alone_listen).abs().max()) < 1e-5
    assert not torch.allclose(feats.speak, feats.listen)
    with pytest.raises(ValueError, match="must hold 48000 samples"):
        cond(torch.zeros(RATE), torch.zeros(3 * RATE))
    half = AudioConditioner(LogMelAudioEncoder(8, 24), chunk_seconds=0.5, history_chunks=2)
    assert half.window_frames == 36 and half.current == range(24, 36)


# -- Wav2Vec2AudioEncoder -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    model = Wav2Vec2Model(cfg).eval()
    path = tmp_path_factory.mktemp("w2v")
    model.save_pretrained(path)
    return path, model


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)


def test_wav2vec2_encoder_uses_the_saved_weights(tiny_wav2vec2):
    path, reference = tiny_wav2vec2
    enc = Wav2Vec2AudioEncoder(path, feature_dim=8, fps=24, layers=[2]).eval()
    audio = torch.randn(2, 3 * RATE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = enc.extract(audio)
        expected = reference(_normalised(audio), output_hidden_states=True).hidden_states[2]
        ours = enc.hidden_states(audio)
    assert feats.shape == (2, 72, 8)
    assert ours.shape[1] == 2398  # the tiny conv stack (strides 5, 4) runs at 800 Hz; real wav2vec2 at 50
    assert float((ours - expected).abs().max()) < 1e-5


def test_wav2vec2_layer_reduction_and_checkpoint_contents(tiny_wav2vec2):
    path, _ = tiny_wav2vec2
    concat = Wav2Vec2AudioEncoder(path, feature_dim=8, fps=24, layers=[0, -1], reduce="concat")
    assert concat.layers == (0, 2) and concat.proj.in_features == 64
    mean = Wav2Vec2AudioEncoder(path, feature_dim=8, fps=25)
    assert mean.layers == (0, 1, 2) and mean.proj.in_features == 32
    audio = torch.randn(1, 2 * RATE)
    with torch.no_grad():
        assert concat.extract(audio).shape == (1, 48, 8) and mean.extract(audio).shape == (1, 50, 8)
        cat = concat.hidden_states(audio)
        last = concat.backbone(_normalised(audio), output_hidden_states=True).hidden_states[2]
    assert float((cat[..., 32:] - last).abs().max()) < 1e-5
    # Only LiveStage's projection is a checkpoint tensor: a seeded init must not touch wav2vec2.
    assert set(mean.state_dict()) == {"proj.weight", "proj.bias"}
    before = {k: v.clone() for k, v in mean.backbone.state_dict().items()}
    seeded_init(mean, 3)
    assert all(torch.equal(before[k], v) for k, v in mean.backbone.state_dict().items())
    with pytest.raises(ValueError, match="layer 3 out of range"):
        Wav2Vec2AudioEncoder(path, feature_dim=8, fps=24, layers=[3])


def test_wav2vec2_follows_dtype_moves_and_stays_deterministic_in_train_mode(tiny_wav2vec2):
    path, _ = tiny_wav2vec2
    enc = Wav2Vec2AudioEncoder(path, feature_dim=8, fps=24).train()
    audio = torch.randn(1, 3 * RATE)
    with torch.no_grad():
        assert torch.equal(enc.extract(audio), enc.extract(audio))  # no dropout in the backbone
        enc.to(dtype=torch.bfloat16)
        out = enc.extract(audio)
    assert next(enc.backbone.parameters()).dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16 and out.shape == (1, 72, 8)


def test_wav2vec2_loads_pytorch_bin_too(tiny_wav2vec2, tmp_path):
    _, reference = tiny_wav2vec2
    reference.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    enc = Wav2Vec2AudioEncoder(tmp_path, feature_dim=8, fps=24)
    assert torch.equal(enc.backbone.feature_projection.projection.weight,
                       reference.feature_projection.projection.weight)


def test_wav2vec2_missing_directory_or_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"wav2vec2 model directory.*{missing}"):
        Wav2Vec2AudioEncoder(missing, feature_dim=8, fps=24)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"no model.safetensors or pytorch_model.bin.*{tmp_path}"):
        Wav2Vec2AudioEncoder(tmp_path, feature_dim=8, fps=24)
