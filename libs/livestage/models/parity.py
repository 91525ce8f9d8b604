"""`livestage checkpoint verify FILE`: run our implementation on a reference parity archive.

An archive is one safetensors file holding `weights.*` (a module state dict in the Wan-native key
layout), `input.*` and `output.*` tensors, and metadata `kind` + `config` (the reference
constructor arguments as JSON). We build our module from that config, load the weights with
strict key checking, run the same call and report the max relative error of every output
(max |ours - reference| / max |reference|).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from livestage.models.config import DiTConfig
from livestage.models.dit import WanDiT
from livestage.models.vae import CausalVideoVAE, VAEConfig
from livestage.models.weights import WeightsError, check_state_dict

DEFAULT_TOLERANCE = 1e-4


@dataclass
class ParityArchive:
    kind: str
    config: dict
    weights: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    path: str


@dataclass
class ParityReport:
    path: str
    kind: str
    tolerance: float
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.errors) and all(e <= self.tolerance for e in self.errors.values())


def read_archive(path: str | Path) -> ParityArchive:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"parity archive not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot read parity archive {path}: {exc}") from None
    if "kind" not in meta or "config" not in meta:
        raise WeightsError(f"{path}: metadata must hold 'kind' and 'config'")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: metadata 'config' is not JSON: {exc}") from None

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return ParityArchive(meta["kind"], config, group("weights."), group("input."), group("output."),
                         str(path))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    if tuple(ours.shape) != tuple(reference.shape):
        raise WeightsError(f"output shape {tuple(ours.shape)} != reference {tuple(reference.shape)}")
    ref = reference.double()
    denom = ref.abs().max().item() or 1.0
    return (ours.double() - ref).abs().max().item() / denom


def _need(archive: ParityArchive, name: str) -> torch.Tensor:
    if name not in archive.inputs:
        raise WeightsError(f"{archive.path}: kind {archive.kind} needs input.{name}")
    return archive.inputs[name]


def _load_strict(module: torch.nn.Module, archive: ParityArchive) -> None:
    check_state_dict(module, archive.weights, source=archive.path)
    module.load_state_dict(archive.weights, strict=True)


def _run_wan_dit(archive: ParityArchive) -> dict[str, torch.Tensor]:
    """Reference call: `WanModel.forward([x], t, [context], seq_len)` with x [C, F, H, W]."""
    config = DiTConfig.from_reference(archive.config)
    model = WanDiT(config).eval()
    _load_strict(model, archive)
    x = _need(archive, "x").float()
    context = _need(archive, "context").float()
    t = _need(archive, "t").float().reshape(-1)
    batched = x.dim() == 5
    x = x if batched else x.unsqueeze(0)
    context = context if context.dim() == 3 else context.unsqueeze(0)
    if t.numel() not in (1, x.shape[0]):
        raise WeightsError(f"input.t has {t.numel()} values for a batch of {x.shape[0]}")
    with torch.no_grad():
        y = model(x, t.expand(x.shape[0]) if t.numel() == 1 else t, context)
    return {"y": y if batched else y[0]}


def _run_wan_vae(archive: ParityArchive) -> dict[str, torch.Tensor]:
    """Reference calls: `encode(video, [mean, 1/std])` then `decode(latent, [mean, 1/std])`."""
    vae = CausalVideoVAE(VAEConfig.from_reference(archive.config)).eval()
    _load_strict(vae, archive)
    mean = archive.inputs.get("latent_mean")
    std = archive.inputs.get("latent_std")
    if mean is not None and std is not None:
        vae.set_latent_stats(mean.float(), std.float())
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if "video" in archive.inputs:
            out["latent"] = vae.encode(archive.inputs["video"].float())
        latent = archive.inputs.get("latent", out.get("latent"))
        if latent is None:
            raise WeightsError(f"{archive.path}: kind wan_vae needs input.video or input.latent")
        out["decoded"] = vae.decode(latent.float())
    return out


RUNNERS: dict[str, Callable[[ParityArchive], dict[str, torch.Tensor]]] = {
    "wan_dit_t2v": _run_wan_dit,
    "wan_vae": _run_wan_vae,
}


def verify_archive(path: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> ParityReport:
    """Runs the archive through our implementation; raises WeightsError on unusable archives."""
    archive = read_archive(path)
    runner = RUNNERS.get(archive.kind)
    if runner is None:
        raise WeightsError(
            f"{archive.path}: unsupported kind {archive.kind!r} (supported: {', '.join(RUNNERS)})"
        )
    if not archive.outputs:
        raise WeightsError(f"{archive.path}: no output.* tensors to compare")
    try:
        ours = runner(archive)
    except (ValueError, RuntimeError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{archive.path}: {exc}") from None
    report = ParityReport(archive.path, archive.kind, tolerance)
    for name, reference in archive.outputs.items():
        if name not in ours:
            raise WeightsError(f"{archive.path}: output.{name} is not produced by kind {archive.kind}")
        report.errors[name] = relative_error(ours[name], reference)
    return report
