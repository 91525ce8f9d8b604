"""The demo model's training set: rendered talking-character clips, then their VAE latents.

Two steps, both cached under the work directory:

1. `render_dataset` draws `clips_per_identity` clips for each identity from a conversation
   scenario (speak and listen audio from the Piper corpus, directives) and stores the frames
   (uint8, one memory-mapped array), the audio of both streams, the per-frame face states (the
   evaluator's ground truth) and each identity's reference images.
2. `encode_dataset` runs the trained VAE over every clip and every reference image: this is what
   the DiT stages train on (`LatentDataset`).

Time alignment is the pipeline's: chunk k of a clip is video time [k, k+1) s; its audio windows
are the 3 s ending at k+1 s. The causal VAE turns the session's first latent into one frame, so
the clip's latents encode frames 3.. of the clip (the decoder pads chunk 0 by holding its first
frame), and every later chunk's 6 latents are exactly its 24 frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from livestage.models.config import ModelPreset
from livestage.models.vae import CausalVideoVAE
from livestage.training.corpus import SpeechCorpus
from livestage.training.renderer import (DIRECTED_NOD_DEGREES, LISTENING_NOD_DEGREES, Identity, MotionModel,
                                         references, render_face)
from livestage.training.scenarios import Scenario, audio_window, conversation

REFERENCE_LAYOUT: tuple[tuple[str, int], ...] = (
    ("global", 0), ("view", 0), ("view", 1), ("expression", 0), ("expression", 1), ("expression", 2))
"""The reference images of an identity, in the order they are stored (kind, index in kind)."""

SAMPLE_IDENTITY_SEED = 1000
"""The bundled sample character (`livestage/media/sample_data`) is this renderer identity."""


def identity_seeds(count: int) -> list[int]:
    """Training identities: the sample character first, then seeds 0..count-2."""
    return [SAMPLE_IDENTITY_SEED, *range(count - 1)]


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames, copy=True)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


@dataclass
class RenderedClip:
    frames: np.ndarray  # uint8 [24N, H, W, 3], the clip's seconds only (no pre-roll)
    mouth_open: np.ndarray  # [24N] ground-truth openness per frame
    motion: np.ndarray  # [24N, 3] yaw, pitch, smile per frame
    scenario: Scenario


def render_scenario(identity: Identity, scenario: Scenario, fps: int, size: tuple[int, int],
                    seed: int) -> RenderedClip:
    """Runs the motion model over pre-roll + clip and draws the clip's frames."""
    total = scenario.seconds * fps
    states = MotionModel(fps, seed).run(scenario.speak, scenario.listen, scenario.sample_rate,
                                        total, scenario.renderer_directives())
    states = states[scenario.preroll_s * fps:]
    frames = np.stack([render_face(identity, s, size) for s in states])
    return RenderedClip(frames, np.array([s.mouth_open for s in states], np.float32),
                        np.array([[s.yaw, s.pitch, s.smile] for s in states], np.float32), scenario)


def render_dataset(out: Path, preset: ModelPreset, corpus: SpeechCorpus, identities: int,
                   clips_per_identity: int, chunks: int, seed: int = 0,
                   sample_identity_weight: int = 3, log=print) -> Path:
    """Renders the clip set into `out` (frames.npy memmap + clips.json + audio.npz + refs.npz)."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {"identities": identities, "clips_per_identity": clips_per_identity, "chunks": chunks,
                "seed": seed, "sample_identity_weight": sample_identity_weight, "size": [preset.height, preset.width],
                "listening_nod_degrees": LISTENING_NOD_DEGREES, "directed_nod_degrees": DIRECTED_NOD_DEGREES,
                "listening_smile": MotionModel.listening_smile}
    if (out / "clips.json").is_file():
        kept = json.loads((out / "clips.json").read_text()).get("settings")
        if kept != settings:
            raise ValueError(f"{out} holds clips rendered with other settings ({kept}, now {settings}): everything "
                             f"trained from them is stale too; remove the work directory {out.parent} or use another")
        return out
    fps, size = preset.chunk.fps, (preset.height, preset.width)
    seeds = identity_seeds(identities)
    plan = [(i, c) for i, s in enumerate(seeds)
            for c in range(clips_per_identity * (sample_identity_weight if s == SAMPLE_IDENTITY_SEED else 1))]
    per_clip = chunks * fps
    frames = np.lib.format.open_memmap(out / "frames.tmp.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(plan) * per_clip, *size, 3))
    meta, audio, mouth, motion = [], {}, [], []
    rng = np.random.default_rng([seed, 3])
    for n, (ident, c) in enumerate(plan):
        scenario = conversation(corpus, chunks, rng)
        clip = render_scenario(Identity.sample(seeds[ident]), scenario, fps, size, seed=int(rng.integers(1 << 30)))
        frames[n * per_clip:(n + 1) * per_clip] = clip.frames
        audio[f"speak{n}"], audio[f"listen{n}"] = scenario.speak, scenario.listen
        mouth.append(clip.mouth_open)
        motion.append(clip.motion)
        meta.append({"identity": ident, "chunks": chunks, "preroll_s": scenario.preroll_s,
                     "directives": scenario.directives, "turns": scenario.turns})
        if n % 20 == 0:
            log(f"rendered clip {n + 1}/{len(plan)}")
    frames.flush()
    del frames
    refs = {}
    for i, s in enumerate(seeds):
        imgs = references(Identity.sample(s), size)
        refs[f"id{i}"] = np.stack([imgs[k][j] for k, j in REFERENCE_LAYOUT])
    np.savez(out / "refs.npz", seeds=np.array(seeds), **refs)
    np.savez(out / "audio.npz", **audio)
    np.savez(out / "states.npz", mouth_open=np.stack(mouth), motion=np.stack(motion))
    (out / "frames.tmp.npy").rename(out / "frames.npy")
    (out / "clips.json").write_text(json.dumps({"settings": settings, "fps": fps, "sample_rate": corpus.sample_rate,
                                                "frames_per_clip": per_clip, "clips": meta}))
    return out


class RenderedDataset:
    """Read access to a rendered clip set (frames are memory-mapped, not loaded)."""

    def __init__(self, root: Path):
        self.root = root
        info = json.loads((root / "clips.json").read_text())
        self.fps, self.sample_rate = info["fps"], info["sample_rate"]
        self.frames_per_clip = info["frames_per_clip"]
        self.clips: list[dict] = info["clips"]
        self.frames = np.load(root / "frames.npy", mmap_mode="r")
        with np.load(root / "audio.npz") as z:
            self.speak = [z[f"speak{i}"] for i in range(len(self.clips))]
            self.listen = [z[f"listen{i}"] for i in range(len(self.clips))]
        with np.load(root / "states.npz") as z:
            self.mouth_open, self.motion = z["mouth_open"], z["motion"]
        with np.load(root / "refs.npz") as z:
            self.identity_seeds = [int(s) for s in z["seeds"]]
            self.reference_images = [z[f"id{i}"] for i in range(len(self.identity_seeds))]

    def __len__(self) -> int:
        return len(self.clips)

    def clip_frames(self, i: int) -> np.ndarray:
        n = self.frames_per_clip
        return self.frames[i * n:(i + 1) * n]


@dataclass
class LatentDataset:
    """What the DiT stages train on: normalised VAE latents of every clip and reference."""

    latents: torch.Tensor  # [clips, z, 6N, h, w] float16
    behaviour: torch.Tensor
    """[clips, 6N] in 0..1: how much nod (pitch) or smile each latent frame shows (see
    `behaviour_per_latent`); the teacher weights those frames up."""
    references: torch.Tensor  # [identities, 6, z, 1, h, w] float32
    identity: list[int]
    directives: list[list[str]]
    speak: list[np.ndarray]  # full scenario audio incl. pre-roll
    listen: list[np.ndarray]
    preroll_s: list[int]
    sample_rate: int

    @property
    def chunks(self) -> int:
        return self.latents.shape[2] // self._latents_per_chunk

    _latents_per_chunk: int = 6

    def audio_windows(self, clip: int, first_chunk: int, chunks: int, history_chunks: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """Speak and listen windows covering `history_chunks` s before `first_chunk` and the
        `chunks` seconds from it (the streaming window for chunks=1)."""
        rate = self.sample_rate
        end = (self.preroll_s[clip] + first_chunk + chunks) * rate
        window = (history_chunks + chunks) * rate
        return audio_window(self.speak[clip], end, window), audio_window(self.listen[clip], end, window)

    def chunk_latents(self, clip: int, first_chunk: int, chunks: int) -> torch.Tensor:
        lpc = self._latents_per_chunk
        return self.latents[clip, :, first_chunk * lpc:(first_chunk + chunks) * lpc].float()

    def chunk_behaviour(self, clip: int, first_chunk: int, chunks: int) -> torch.Tensor:
        lpc = self._latents_per_chunk
        return self.behaviour[clip, first_chunk * lpc:(first_chunk + chunks) * lpc]

    def save(self, path: Path) -> None:
        torch.save({"latents": self.latents, "behaviour": self.behaviour, "references": self.references, "identity": self.identity,
                    "directives": self.directives, "speak": self.speak, "listen": self.listen,
                    "preroll_s": self.preroll_s, "sample_rate": self.sample_rate,
                    "latents_per_chunk": self._latents_per_chunk}, path)

    @classmethod
    def load(cls, path: Path) -> "LatentDataset":
        d = torch.load(path, weights_only=False)
        ds = cls(d["latents"], d["behaviour"], d["references"], d["identity"], d["directives"], d["speak"],
                 d["listen"], d["preroll_s"], d["sample_rate"])
        ds._latents_per_chunk = d["latents_per_chunk"]
        return ds


def behaviour_per_latent(motion: np.ndarray, frames_per_latent: int, nod_degrees: float = LISTENING_NOD_DEGREES) -> np.ndarray:
    """Per-frame [F, 3] yaw, pitch, smile -> per-latent [F / frames_per_latent] nod-or-smile
    strength in 0..1 (the strongest frame of each latent's frames).

    Nods and smiles are small in pixels (a 16-degree nod moves a 128-pixel face by about 6
    pixels), so an unweighted flow-matching loss hardly notices them; the teacher weights these
    frames up so that listening behaviour is learnt at all."""
    pitch = np.abs(motion[:, 1]) / nod_degrees
    smile = motion[:, 2]
    per_frame = np.clip(np.maximum(pitch, smile), 0.0, 1.0)
    return per_frame.reshape(-1, frames_per_latent).max(axis=1).astype(np.float32)


@torch.no_grad()
def encode_video(vae: CausalVideoVAE, frames: np.ndarray) -> torch.Tensor:
    """uint8 frames of whole chunks [24N, H, W, 3] -> normalised latents [z, 6N, h, w]."""
    lead = vae.config.temporal_factor - 1  # the first latent is a single frame
    video = frames_to_tensor(frames[lead:])[None]
    return vae.encode(video)[0]


@torch.no_grad()
def encode_dataset(rendered: RenderedDataset, vae: CausalVideoVAE, latents_per_chunk: int,
                   log=print) -> LatentDataset:
    vae.eval()
    latents = []
    for i in range(len(rendered)):
        latents.append(encode_video(vae, rendered.clip_frames(i)).half())
        if i % 20 == 0:
            log(f"encoded clip {i + 1}/{len(rendered)}")
    refs = []
    for imgs in rendered.reference_images:
        video = frames_to_tensor(imgs)  # [3, 6, H, W]: encode each image as its own one-frame video
        refs.append(torch.stack([vae.encode_image(video[:, j][None])[0] for j in range(video.shape[1])]))
    frames_per_latent = vae.config.temporal_factor
    behaviour = torch.from_numpy(np.stack([behaviour_per_latent(m, frames_per_latent) for m in rendered.motion]))
    ds = LatentDataset(torch.stack(latents), behaviour, torch.stack(refs).float(),
                       [c["identity"] for c in rendered.clips], [c["directives"] for c in rendered.clips],
                       rendered.speak, rendered.listen, [c["preroll_s"] for c in rendered.clips],
                       rendered.sample_rate)
    ds._latents_per_chunk = latents_per_chunk
    return ds


SAMPLE_REFERENCE_FILES: tuple[str, ...] = (
    "character.png", "view_left.png", "view_right.png",
    "expression_smile.png", "expression_open.png", "expression_blink.png")
"""File names of the sample character's references in `livestage/media/sample_data`, in
`REFERENCE_LAYOUT` order."""


def sample_character_images(size: tuple[int, int] = (128, 128)) -> list[np.ndarray]:
    """The bundled sample character's reference images, as the renderer draws them."""
    imgs = references(Identity.sample(SAMPLE_IDENTITY_SEED), size)
    return [imgs[k][j] for k, j in REFERENCE_LAYOUT]


def write_sample_character(root: Path) -> None:
    """(Re)writes the sample character's PNGs (they are committed; a test keeps them true)."""
    from PIL import Image

    for name, img in zip(SAMPLE_REFERENCE_FILES, sample_character_images()):
        Image.fromarray(img).save(root / name, optimize=True)
