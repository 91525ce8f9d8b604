"""Builds every model of a preset (backbone, refiner, VAE, audio and text encoders) in one place.

Weights come from a directory holding one safetensors file per model (`backbone.safetensors`,
`refiner.safetensors`, `vae.safetensors`, `audio_encoder.safetensors`, `text_encoder.safetensors`).
Without a directory, a preset whose trained weights ship with the package (`demo`, made by
`livestage train`, in `livestage/models/trained/<preset>/`) loads those; any other preset, and
only when the caller allows it, gets a seeded deterministic initialisation, labelled
`seeded:<seed>` in `AvatarModels.sources` and in the logs.

The VAE's per-channel latent statistics are not parameters of the reference layout; a trained
VAE file carries them in its safetensors metadata (`latent_mean`, `latent_std`, JSON lists).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from livestage.models.audio import LogMelAudioEncoder, Wav2Vec2AudioEncoder
from livestage.models.config import ModelPreset, get_preset
from livestage.models.dit import WanDiT, is_extra_key
from livestage.models.text import CachedTextEncoder, HashedTextEncoder
from livestage.models.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, CausalVideoVAE
from livestage.models.weights import WeightsError, WeightsSource, load_weights, read_metadata, seeded_init

log = logging.getLogger("livestage.models.bundle")

WEIGHT_FILES = {
    "backbone": "backbone.safetensors",
    "refiner": "refiner.safetensors",
    "vae": "vae.safetensors",
    "audio_encoder": "audio_encoder.safetensors",
    "text_encoder": "text_encoder.safetensors",
}

TRAINED_ROOT = Path(__file__).resolve().parent / "trained"


def shipped_weights_dir(preset: str) -> Path | None:
    """The directory of trained weights shipped for `preset`, if every weight file is there."""
    root = TRAINED_ROOT / preset
    if all((root / name).is_file() for name in WEIGHT_FILES.values()):
        return root
    return None


def read_latent_stats(path: Path) -> tuple[list[float], list[float]] | None:
    meta = read_metadata(path)
    if "latent_mean" not in meta or "latent_std" not in meta:
        return None
    try:
        return json.loads(meta["latent_mean"]), json.loads(meta["latent_std"])
    except ValueError:
        raise WeightsError(f"{path}: latent_mean/latent_std metadata is not a JSON list") from None


# Seeds of the individual models derive from one session-independent seed, so the backbone
# and the refiner never share weights by accident.
_SEED_OFFSETS = {"backbone": 0, "refiner": 1, "vae": 2, "audio_encoder": 3, "text_encoder": 4}


@dataclass
class AvatarModels:
    preset: ModelPreset
    backbone: WanDiT
    refiner: WanDiT
    vae: CausalVideoVAE
    audio_encoder: nn.Module
    text_encoder: CachedTextEncoder
    sources: dict[str, WeightsSource] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def seeded(self) -> bool:
        """True if any model runs on seeded random weights (not a trained model)."""
        return any(s.seeded for s in self.sources.values())

    def describe(self) -> dict[str, str]:
        return {name: str(src) for name, src in self.sources.items()}


def _audio_encoder(preset: ModelPreset, audio_model_dir: Path | None) -> nn.Module:
    if preset.audio_encoder == "wav2vec2":
        if audio_model_dir is None:
            raise WeightsError(f"preset {preset.name} uses wav2vec2: give the model directory")
        return Wav2Vec2AudioEncoder(audio_model_dir, feature_dim=preset.dit.audio_dim,
                                    fps=preset.chunk.fps)
    return LogMelAudioEncoder.for_preset(preset)


def build_models(preset: ModelPreset | str, weights_dir: str | Path | None = None, *,
                 seed: int = 0, allow_seeded: bool = True, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, allow_base_wan: bool = False,
                 audio_model_dir: str | Path | None = None, compile: bool = False,
                 use_shipped: bool = True) -> AvatarModels:
    """Builds and loads every model of `preset`.

    Without `weights_dir`, the preset's shipped trained weights are used if there are any
    (`use_shipped=False` skips them: the seeded baseline of a trained preset).
    `allow_seeded=False` (production) turns a missing weights directory into an error instead of
    random weights. `allow_base_wan=True` lets a plain Wan2.1 checkpoint fill the DiTs, leaving
    LiveStage's extra modules at their initialisation (logged).
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    if weights_dir is None and use_shipped:
        weights_dir = shipped_weights_dir(preset.name)
    if weights_dir is None and not allow_seeded:
        raise WeightsError(
            f"no weights directory given for preset {preset.name} and seeded weights are not allowed"
        )
    modules: dict[str, nn.Module] = {
        "backbone": WanDiT(preset.dit, preset.chunk),
        "refiner": WanDiT(preset.dit, preset.chunk),
        "vae": CausalVideoVAE(preset.vae),
        "audio_encoder": _audio_encoder(preset, Path(audio_model_dir) if audio_model_dir else None),
        "text_encoder": HashedTextEncoder(
            vocab_size=preset.text_vocab_size, text_dim=preset.dit.text_dim,
            max_tokens=preset.text_max_tokens,
        ),
    }
    sources: dict[str, WeightsSource] = {}
    for name, module in modules.items():
        if weights_dir is None:
            sources[name] = seeded_init(module, seed * 101 + _SEED_OFFSETS[name])
            continue
        path = Path(weights_dir) / WEIGHT_FILES[name]
        allow = is_extra_key if (allow_base_wan and name in ("backbone", "refiner")) else None
        sources[name] = load_weights(module, path, allow_missing=allow)
    vae: CausalVideoVAE = modules["vae"]  # type: ignore[assignment]
    stats = read_latent_stats(Path(weights_dir) / WEIGHT_FILES["vae"]) if weights_dir is not None else None
    if stats is not None:
        vae.set_latent_stats(torch.tensor(stats[0]), torch.tensor(stats[1]))
    elif preset.vae.z_dim == len(WAN21_LATENT_MEAN) and weights_dir is not None and preset.name in (
            "wan-1.3b", "lpm-14b"):
        vae.set_latent_stats(torch.tensor(WAN21_LATENT_MEAN), torch.tensor(WAN21_LATENT_STD))
    for module in modules.values():
        module.to(device=device, dtype=dtype).eval()
    if compile:
        # torch.compile each DiT block (one graph serves every block: parameters are inputs) and
        # the VAE decoder; the first chunks pay the compile time.
        for dit in (modules["backbone"], modules["refiner"]):
            for block in dit.blocks:  # type: ignore[union-attr]
                block.compile()
        modules["vae"].decoder.compile()  # type: ignore[union-attr]
    if any(s.seeded for s in sources.values()):
        log.warning("preset %s runs on SEEDED RANDOM weights: output is noise, not a trained avatar",
                    preset.name)
    return AvatarModels(
        preset=preset, backbone=modules["backbone"], refiner=modules["refiner"], vae=vae,  # type: ignore[arg-type]
        audio_encoder=modules["audio_encoder"],
        text_encoder=CachedTextEncoder(modules["text_encoder"]),  # type: ignore[arg-type]
        sources=sources, device=torch.device(device), dtype=dtype,
    )
