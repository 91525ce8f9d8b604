"""Bundled sample inputs: the sample character, and procedural stand-ins for tests.

- `SampleCharacter`: the character every demo uses (`sample_data/`): Ada, a renderer identity
  the shipped demo model was trained with (`livestage.training.dataset.SAMPLE_IDENTITY_SEED`),
  with her reference images (portrait, two views, three expressions), persona, a spoken question
  (the user's side) and a spoken answer (Piper speech, for rendering without the TTS service).
- `sample_character` / `sample_speech`: a portrait drawn with Pillow and a synthetic
  glottal-pulse voice with syllable-rate loudness, for tests and benchmarks that need an input
  of any size without files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from PIL import Image, ImageDraw

from livestage.media.audio import load_audio
from livestage.media.image import decode_image


@dataclass
class SampleCharacter:
    name: str
    persona: str
    voice: str
    references: list[tuple[str, bytes]]  # (kind, encoded image), the global portrait first
    question: np.ndarray  # 16 kHz mono
    question_text: str
    answer: np.ndarray
    answer_text: str

    @property
    def image(self) -> bytes:
        """The global portrait (PNG bytes)."""
        return self.references[0][1]

    @classmethod
    def load(cls) -> "SampleCharacter":
        root = resources.files("livestage.media") / "sample_data"
        spec = json.loads((root / "character.json").read_text())

        def audio(name: str) -> np.ndarray:
            with resources.as_file(root / spec[name]["file"]) as wav:
                return load_audio(wav, 16000)

        refs = [(r["kind"], (root / r["file"]).read_bytes()) for r in spec["references"]]
        return cls(spec["name"], spec["persona"], spec["voice"], refs, audio("question"),
                   spec["question"]["text"], audio("answer"), spec["answer"]["text"])

    def reference_images(self, size: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
        """The references decoded to [3, H, W] in [-1, 1] at `size`."""
        return [(kind, decode_image(data, size, name=f"sample {kind}")) for kind, data in self.references]


def sample_character(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A simple front-facing portrait [3, H, W] in [-1, 1], different colours per seed."""
    height, width = size
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(40, 200, 3))
    skin = tuple(int(v) for v in rng.integers(150, 240, 3))
    hair = tuple(int(v) for v in rng.integers(0, 120, 3))
    shirt = tuple(int(v) for v in rng.integers(0, 255, 3))
    img = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(img)
    w, h = width, height
    d.rectangle([0.15 * w, 0.8 * h, 0.85 * w, h], fill=shirt)
    d.ellipse([0.27 * w, 0.12 * h, 0.73 * w, 0.72 * h], fill=hair)
    d.ellipse([0.3 * w, 0.2 * h, 0.7 * w, 0.78 * h], fill=skin)
    for x in (0.41, 0.59):
        d.ellipse([(x - 0.04) * w, 0.4 * h, (x + 0.04) * w, 0.46 * h], fill=(255, 255, 255))
        d.ellipse([(x - 0.018) * w, 0.41 * h, (x + 0.018) * w, 0.45 * h], fill=(30, 30, 30))
    d.ellipse([0.43 * w, 0.6 * h, 0.57 * w, 0.66 * h], fill=(150, 40, 50))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def sample_speech(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Speech-like mono float32 audio: voiced syllables (~4/s) with pauses, peak about 0.5."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + rng.uniform(-10, 10)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    phrases = (np.sin(2 * np.pi * 0.35 * t + rng.uniform(0, 6)) > -0.6).astype(np.float64)
    noise = rng.normal(0, 0.05, n)
    signal = (voiced * 0.15 + noise) * syllables * phrases
    peak = np.abs(signal).max() or 1.0
    return (0.5 * signal / peak).astype(np.float32)
