"""Loading and saving weights (safetensors, Wan-native keys) with errors that name the problem.

Production code never runs on silently random weights: either a file is loaded with strict key
and shape checking, or the caller explicitly asked for a seeded deterministic initialisation,
which is then labelled as such (`WeightsSource.seeded`) in logs and outputs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("livestage.models.weights")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(root: Path) -> dict[str, str]:
    """sha256 of every safetensors file in a weights directory: what a report or a log names
    instead of a machine's path, so a result can be matched to the weights that produced it."""
    return {p.name: sha256_file(p) for p in sorted(Path(root).glob("*.safetensors"))}


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not match the model (names the key)."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a module's weights came from; `seeded` means deterministic random, not trained."""

    kind: str  # "file" or "seeded"
    detail: str  # the path, or the seed

    @property
    def seeded(self) -> bool:
        return self.kind == "seeded"

    def __str__(self) -> str:
        return f"{self.kind}:{self.detail}"


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot read safetensors file {path}: {exc}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot read safetensors file {path}: {exc}") from None


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                     allow_missing: Callable[[str], bool] | None = None) -> list[str]:
    """Strict comparison of `state` against `module`; returns the allowed-missing keys.

    Raises `WeightsError` naming the first offending key: unexpected keys, missing keys (unless
    under an allowed prefix: LiveStage's extra modules when loading a base Wan checkpoint), and
    shape mismatches.
    """
    expected = module.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source}: unexpected key {unexpected[0]!r}{more}")
    missing = sorted(set(expected) - set(state))
    fatal = [k for k in missing if not (allow_missing and allow_missing(k))]
    if fatal:
        more = f" (+{len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise WeightsError(f"{source}: missing key {fatal[0]!r}{more}")
    for key, value in state.items():
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            raise WeightsError(
                f"{source}: shape mismatch for key {key!r}: file has {tuple(value.shape)}, "
                f"model expects {want}"
            )
    return missing


def load_weights(module: nn.Module, path: str | Path,
                 allow_missing: Callable[[str], bool] | None = None) -> WeightsSource:
    """Loads a safetensors file into `module` with strict checking (see `check_state_dict`)."""
    state = read_safetensors(path)
    missing = check_state_dict(module, state, source=str(path),
                               allow_missing=allow_missing)
    module.load_state_dict(state, strict=False)
    if missing:
        log.warning("weights %s lack %d extra-module tensors; those keep their initialisation",
                    path, len(missing))
    return WeightsSource("file", str(path))


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata or {})


def seeded_init(module: nn.Module, seed: int) -> WeightsSource:
    """Deterministic, clearly-labelled random initialisation (for tests, benchmarks, dev).

    Every submodule's own default initialisation is re-run under a private RNG seeded with
    `seed`, so the same seed gives the same weights in any process; modulation tables get the
    reference's randn/sqrt(dim) and norm scales start at one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, sub in module.named_modules():
                if sub is module:
                    continue
                for reset in ("reset_parameters", "_reset_parameters"):
                    if callable(getattr(sub, reset, None)):
                        getattr(sub, reset)()
                        break
            for name, param in module.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf == "modulation":
                    param.copy_(torch.randn(param.shape) / param.shape[-1] ** 0.5)
                elif leaf == "gamma" or (leaf == "weight" and "norm" in name and param.dim() == 1):
                    param.fill_(1.0)
    log.warning("using SEEDED RANDOM weights (seed=%d) for %s: not a trained model",
                seed, type(module).__name__)
    return WeightsSource("seeded", str(seed))
