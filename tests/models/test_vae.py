"""The causal VAE: parity with the Wan2.1 reference, streaming decode, bounded state, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from livestage.models.vae import CausalVideoVAE, VAEConfig
from livestage.models.weights import seeded_init

torch.set_grad_enabled(False)
PARITY = Path(__file__).resolve().parents[3] / "shared" / "parity" / "wan_vae_a.safetensors"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.skipif(not PARITY.exists(), reason="shared parity cases not present")
def test_reproduces_reference_encode_and_decode():
    with safe_open(str(PARITY), "pt") as f:
        cfg = VAEConfig.from_reference(json.loads(f.metadata()["config"]))
        vae = CausalVideoVAE(cfg).eval()
        vae.load_state_dict({k[8:]: f.get_tensor(k) for k in f.keys() if k.startswith("weights.")},
                            strict=True)
        vae.set_latent_stats(f.get_tensor("input.latent_mean"), f.get_tensor("input.latent_std"))
        latent = vae.encode(f.get_tensor("input.video"))
        assert _rel(latent, f.get_tensor("output.latent")) < 1e-4
        assert _rel(vae.decode(f.get_tensor("output.latent")), f.get_tensor("output.decoded")) < 1e-4


def _vae(**kw) -> CausalVideoVAE:
    vae = CausalVideoVAE(VAEConfig(dim=4, z_dim=16, num_res_blocks=1, **kw)).eval()
    seeded_init(vae, 3)
    return vae


@pytest.mark.parametrize("split", [(1, 3, 2), (2, 4), (6,), (1, 1, 1, 1, 1, 1)])
def test_streaming_decode_equals_decoding_everything_at_once(split):
    vae = _vae()
    latents = torch.randn(1, 16, sum(split), 4, 6)
    full = vae.decode(latents)
    state = vae.new_decode_state()
    parts, start = [], 0
    for n in split:
        parts.append(vae.decode_chunk(latents[:, :, start:start + n], state))
        start += n
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == full.shape == (1, 3, 1 + 4 * (sum(split) - 1), 32, 48)
    assert float((streamed - full).abs().max()) < 1e-5
    assert state.num_latents_decoded == sum(split)


def test_decode_state_memory_is_bounded():
    vae = _vae(decoder_res_blocks=1)
    state = vae.new_decode_state()
    sizes = []
    for _ in range(50):
        vae.decode_chunk(torch.randn(1, 16, 1, 4, 4), state)
        sizes.append(state.nbytes())
    assert len(set(sizes[3:])) == 1 and sizes[-1] > 0


def test_first_latent_gives_one_frame_and_later_latents_four():
    vae = _vae()
    state = vae.new_decode_state()
    assert vae.decode_chunk(torch.randn(1, 16, 1, 2, 2), state).shape[2] == 1
    assert vae.decode_chunk(torch.randn(1, 16, 2, 2, 2), state).shape[2] == 8


def test_encode_rejects_bad_shapes_with_clear_messages():
    vae = _vae()
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 1, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 3, 2, 2, 2))


def test_encode_image_gives_one_latent_frame_and_depends_on_the_image():
    vae = _vae()
    a = vae.encode_image(torch.rand(1, 3, 16, 16) * 2 - 1)
    b = vae.encode_image(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert a.shape == (1, 16, 1, 2, 2)
    assert float((a - b).abs().max()) > 1e-4


def test_reference_config_with_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown VAE config keys: bogus"):
        VAEConfig.from_reference({"dim": 8, "bogus": 1})
