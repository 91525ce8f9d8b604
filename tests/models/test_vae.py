"""The causal VAE: parity with the Wan2.1 reference, streaming decode, bounded and portable
decode state, strict Wan key layout, and input validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from livestage.models.vae import (
    CONTEXT_FRAMES,
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    CausalConv3d,
    CausalVideoVAE,
    VAEConfig,
    VAEDecodeState,
    VAEEncodeState,
)

PARITY = Path(__file__).resolve().parents[3] / "shared" / "parity" / "wan_vae_a.safetensors"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|"""
    assert ours.shape == ref.shape
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> CausalVideoVAE:
    """A small random VAE in the full Wan layout (4x time, 8x space) that runs in milliseconds."""
    cfg = dict(dim=4, z_dim=4, num_res_blocks=1)
    cfg.update(kw)
    vae = CausalVideoVAE(VAEConfig(**cfg)).eval().to(dtype)
    gen = torch.Generator().manual_seed(seed)
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        else:  # fan-in scaled, so the signal neither vanishes nor explodes through the stages
            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    return vae


def _decode_in_chunks(vae: CausalVideoVAE, latents: torch.Tensor, split: tuple[int, ...],
                      state: VAEDecodeState | None = None) -> torch.Tensor:
    state = state or vae.new_decode_state()
    parts, start = [], 0
    for n in split:
        parts.append(vae.decode_chunk(latents[:, :, start:start + n], state))
        start += n
    return torch.cat(parts, dim=2)


# -- 1. parity with the reference --------------------------------------------------------------


@pytest.mark.skipif(not PARITY.exists(), reason="shared parity cases not present")
def test_reproduces_reference_encode_and_decode():
    with safe_open(str(PARITY), "pt") as f:
        cfg = VAEConfig.from_reference(json.loads(f.metadata()["config"]))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    vae = CausalVideoVAE(cfg).eval()
    vae.load_state_dict({k[len("weights."):]: v for k, v in tensors.items()
                         if k.startswith("weights.")}, strict=True)
    vae.set_latent_stats(tensors["input.latent_mean"], tensors["input.latent_std"])

    latent = vae.encode(tensors["input.video"])
    assert _rel(latent, tensors["output.latent"]) < 1e-4

    ref = tensors["output.decoded"]
    decoded = vae.decode(tensors["output.latent"])
    assert _rel(decoded, ref) < 1e-4
    # The reference decode is not clamped (this case overshoots [-1, 1]); clamp=True clamps.
    assert ref.abs().max() > 1
    clamped = vae.decode(tensors["output.latent"], clamp=True)
    assert clamped.abs().max() <= 1 and _rel(clamped, ref.clamp(-1, 1)) < 1e-4
    # Streaming the same latents one at a time reproduces the reference too.
    streamed = _decode_in_chunks(vae, tensors["output.latent"], (1, 1, 1))
    assert _rel(streamed, ref) < 1e-4


# -- 2. streaming decode equals decoding everything at once ------------------------------------


@pytest.mark.parametrize("split", [(1, 3, 2), (2, 4), (1, 1, 1, 1, 1, 1), (5, 1)])
def test_streaming_decode_equals_full_decode(split):
    vae = _tiny()
    latents = torch.randn(1, 4, sum(split), 3, 5, generator=torch.Generator().manual_seed(1))
    full = vae.decode(latents)
    state = vae.new_decode_state()
    streamed = _decode_in_chunks(vae, latents, split, state)
    assert full.shape == (1, 3, 1 + 4 * (sum(split) - 1), 24, 40)
    assert streamed.shape == full.shape
    assert _rel(streamed, full) < 1e-5
    assert state.num_latents_decoded == sum(split)


def test_streaming_is_exact_in_float64_and_with_bounded_passes():
    """In float64 rounding noise vanishes, so any mismatch would be a logic error."""
    vae = _tiny(seed=2, dtype=torch.float64)
    latents = torch.randn(2, 4, 6, 2, 3, dtype=torch.float64)
    full = vae.decode(latents)
    assert _rel(_decode_in_chunks(vae, latents, (1, 3, 2)), full) < 1e-12
    assert _rel(vae.decode(latents, max_latents_per_pass=2), full) < 1e-12


def test_first_latent_gives_one_frame_and_later_latents_four():
    vae = _tiny()
    state = vae.new_decode_state()
    assert vae.decode_chunk(torch.randn(1, 4, 1, 2, 2), state).shape == (1, 3, 1, 16, 16)
    assert vae.decode_chunk(torch.randn(1, 4, 1, 2, 2), state).shape == (1, 3, 4, 16, 16)
    assert vae.decode_chunk(torch.randn(1, 4, 3, 2, 2), state).shape == (1, 3, 12, 16, 16)
    assert state.num_latents_decoded == 5


def test_batch_items_are_decoded_independently():
    vae = _tiny()
    latents = torch.randn(3, 4, 3, 2, 2)
    batched = vae.decode(latents)
    for i in range(3):
        assert _rel(batched[i:i + 1], vae.decode(latents[i:i + 1])) < 1e-5
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    enc = vae.encode(video)
    assert _rel(enc[1:], vae.encode(video[1:])) < 1e-5


# -- 3. strict loading in the Wan key layout ---------------------------------------------------


def test_state_dict_uses_the_wan_key_layout_and_loads_strictly():
    vae = CausalVideoVAE(VAEConfig(dim=4, z_dim=4, num_res_blocks=1))
    keys = set(vae.state_dict())
    for key in ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
                "encoder.downsamples.0.residual.2.weight", "encoder.downsamples.0.residual.3.gamma",
                "encoder.downsamples.0.residual.6.bias", "encoder.downsamples.1.resample.1.weight",
                "encoder.downsamples.3.time_conv.weight", "encoder.downsamples.2.shortcut.weight",
                "encoder.middle.1.to_qkv.weight", "encoder.middle.1.proj.bias",
                "encoder.middle.1.norm.gamma", "encoder.head.0.gamma", "encoder.head.2.weight",
                "conv1.weight", "conv2.bias", "decoder.conv1.weight",
                "decoder.upsamples.2.time_conv.weight", "decoder.upsamples.2.resample.1.weight",
                "decoder.head.2.weight"):
        assert key in keys, key
    assert not any("latent_mean" in k or "latent_std" in k for k in keys)
    assert vae.state_dict()["encoder.middle.1.norm.gamma"].shape == (16, 1, 1)
    assert vae.state_dict()["decoder.upsamples.2.time_conv.weight"].shape == (32, 16, 3, 1, 1)

    good = {k: v.clone() for k, v in vae.state_dict().items()}
    CausalVideoVAE(vae.config).load_state_dict(good, strict=True)

    missing = dict(good)
    missing.pop("decoder.head.2.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        CausalVideoVAE(vae.config).load_state_dict(missing, strict=True)
    extra = dict(good, **{"decoder.head.3.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        CausalVideoVAE(vae.config).load_state_dict(extra, strict=True)
    wrong = dict(good, **{"conv2.weight": torch.zeros(4, 4, 1, 1, 2)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        CausalVideoVAE(vae.config).load_state_dict(wrong, strict=True)


def test_default_config_has_the_wan21_shape():
    cfg = VAEConfig()
    assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 8)
    with torch.device("meta"):  # shapes only: no memory, no init time
        vae = CausalVideoVAE(cfg)
    n = sum(p.numel() for p in vae.parameters())
    assert 120e6 < n < 135e6  # the published Wan2.1 VAE has ~127M parameters
    assert vae.state_dict()["decoder.upsamples.0.residual.2.weight"].shape == (384, 384, 3, 3, 3)


# -- 4. input validation -----------------------------------------------------------------------


def test_encode_rejects_bad_shapes_with_clear_messages():
    vae = _tiny()
    with pytest.raises(ValueError, match=r"1 \+ 4k frames .* got 4"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8, got 12x16"):
        vae.encode(torch.zeros(1, 3, 1, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="floating point"):
        vae.encode(torch.zeros(1, 3, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.encode_image(torch.zeros(1, 3, 1, 16, 16))


def test_decode_rejects_bad_latents_and_a_changed_geometry():
    vae = _tiny()
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, T>=1, h, w\]"):
        vae.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 4, 0, 2, 2))
    state = vae.new_decode_state()
    vae.decode_chunk(torch.zeros(1, 4, 1, 2, 2), state)
    with pytest.raises(ValueError, match="start a new state"):
        vae.decode_chunk(torch.zeros(1, 4, 1, 2, 3), state)


def test_config_from_reference_and_validation():
    cfg = VAEConfig.from_reference({"dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2],
                                    "temperal_downsample": [True, False], "attn_scales": []})
    assert cfg.dim_mult == (1, 2, 2) and cfg.temperal_downsample == (True, False)
    assert (cfg.temporal_factor, cfg.spatial_factor) == (2, 4)
    hash(cfg)  # tuples, so usable as a key
    with pytest.raises(ValueError, match="unknown VAE config keys: bogus, zz"):
        VAEConfig.from_reference({"dim": 8, "zz": 1, "bogus": 1})
    with pytest.raises(ValueError, match="temperal_downsample"):
        VAEConfig(dim_mult=(1, 2), temperal_downsample=(True, True))


def test_non_default_layout_round_trips_shapes():
    vae = _tiny(dim_mult=(1, 2, 2), temperal_downsample=(True, False), attn_scales=(0.5,))
    latent = vae.encode(torch.rand(1, 3, 5, 8, 12) * 2 - 1)
    assert latent.shape == (1, 4, 3, 2, 3)
    assert vae.decode(latent).shape == (1, 3, 5, 8, 12)


# -- 5. decode state: bounded, portable --------------------------------------------------------


def test_decode_state_memory_is_bounded():
    vae = _tiny()
    state = vae.new_decode_state()
    sizes = []
    for _ in range(50):
        vae.decode_chunk(torch.randn(1, 4, 1, 2, 2), state)
        sizes.append(state.nbytes())
    assert sizes[-1] > 0 and len(set(sizes[2:])) == 1
    # Only the last CONTEXT_FRAMES input frames per causal conv (1 for the stride-2 encoder
    # downsamplers, which the decoder does not have), at the resolution of that conv.
    assert all(t.shape[2] == CONTEXT_FRAMES for t in state.tails.values())
    n_causal = sum(1 for m in vae.decoder.modules() if isinstance(m, CausalConv3d) and m.context)
    assert len(state.tails) == n_causal


def test_decode_state_survives_serialisation_and_snapshots(tmp_path):
    vae = _tiny()
    latents = torch.randn(1, 4, 5, 2, 3)
    full = vae.decode(latents)
    state = vae.new_decode_state()
    head = vae.decode_chunk(latents[:, :, :2], state)
    save_file(state.to_tensors(), str(tmp_path / "state.safetensors"))
    snapshot = copy.deepcopy(state)
    restored = VAEDecodeState.from_tensors(load_file(str(tmp_path / "state.safetensors")))
    assert restored.num_latents_decoded == 2 and restored.nbytes() == state.nbytes()
    for s in (state, snapshot, restored):
        tail = vae.decode_chunk(latents[:, :, 2:], s)
        assert _rel(torch.cat([head, tail], dim=2), full) < 1e-5
    with pytest.raises(ValueError, match="num_latents_decoded"):
        VAEDecodeState.from_tensors({})


# -- latent statistics, images, autograd -------------------------------------------------------


def test_latent_stats_normalise_and_are_not_checkpoint_state():
    vae = _tiny(z_dim=16)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    raw = vae.encode(video)
    vae.set_latent_stats(torch.tensor(WAN21_LATENT_MEAN), torch.tensor(WAN21_LATENT_STD))
    normed = vae.encode(video)
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
    assert _rel(normed, (raw - mean) / std) < 1e-5
    # decode undoes the normalisation: same frames from normalised latents with stats set
    plain = _tiny(z_dim=16)
    assert _rel(vae.decode(normed), plain.decode(raw)) < 1e-4
    assert "latent_mean" not in vae.state_dict()
    with pytest.raises(ValueError, match="16 values"):
        vae.set_latent_stats(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="positive"):
        vae.set_latent_stats(torch.zeros(16), torch.zeros(16))


def test_encode_image_is_a_one_frame_video():
    vae = _tiny()
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    latent = vae.encode_image(images)
    assert latent.shape == (2, 4, 1, 2, 3)
    assert _rel(latent, vae.encode(images.unsqueeze(2))) == 0
    assert float((latent[0] - latent[1]).abs().max()) > 1e-3


def test_long_video_encodes_in_bounded_passes_with_the_same_result():
    """`encode` runs 16-frame passes after the first frame; the split must not change values."""
    vae = _tiny(dtype=torch.float64)
    video = torch.rand(1, 3, 37, 8, 8, dtype=torch.float64) * 2 - 1  # 1 + 36 frames: 3 passes
    latent = vae.encode(video)
    assert latent.shape == (1, 4, 10, 1, 1)
    # Causality: the latents of a prefix do not depend on later frames.
    assert _rel(vae.encode(video[:, :, :21]), latent[:, :, :6]) < 1e-12


@pytest.mark.parametrize("split", [(1, 36), (5, 8, 24), (13, 4, 4, 16)])
def test_streaming_encode_equals_full_encode(split):
    vae = _tiny(dtype=torch.float64)
    video = torch.rand(1, 3, 37, 8, 8, dtype=torch.float64) * 2 - 1
    state, parts, start = VAEEncodeState(), [], 0
    for n in split:
        parts.append(vae.encode_chunk(video[:, :, start:start + n], state))
        start += n
    assert state.frames_encoded == 37
    assert _rel(torch.cat(parts, dim=2), vae.encode(video)) < 1e-12


def test_streaming_encode_rejects_a_misaligned_piece():
    vae = _tiny()
    state = VAEEncodeState()
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        vae.encode_chunk(torch.zeros(1, 3, 4, 8, 8), state)
    vae.encode_chunk(torch.zeros(1, 3, 5, 8, 8), state)
    with pytest.raises(ValueError, match="4k frames after the first call"):
        vae.encode_chunk(torch.zeros(1, 3, 5, 8, 8), state)


def test_works_with_autograd_enabled():
    vae = _tiny()
    latents = torch.randn(1, 4, 3, 2, 2)
    fast = vae.decode(latents)
    with torch.enable_grad():
        latents.requires_grad_(True)
        slow = vae.decode(latents)
        slow.square().mean().backward()
    assert _rel(slow.detach(), fast) < 1e-5
    assert latents.grad is not None and latents.grad.abs().sum() > 0
