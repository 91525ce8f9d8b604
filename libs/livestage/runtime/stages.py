"""The four pipeline stages, each with its per-session state: the units the services split apart.

- `ConditionEncoder` (stage `encoder`): reference images -> VAE latents; per chunk, the 3 s audio
  windows of the speak and listen streams -> audio features, the text directive -> text features.
  `EncoderSession` holds one session's audio streams on the encoder, so each sample is sent to it
  once instead of three times inside overlapping windows.
- `GeneratorSession` (stage `generator`): the 2-step backbone and its `NoisyHistoryCache`.
- `RefinerSession` (stage `refiner`): the 1-step refiner and its `CleanHistoryCache`.
- `DecoderSession` (stage `decoder`): streaming VAE decode with the per-session conv cache.

The in-process runtime chains them directly; the services run one stage each and carry
`ChunkInputs` / latents / frames between them over NATS.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from livestage.models.audio import StreamingAudioWindow
from livestage.models.bundle import AvatarModels
from livestage.models.config import MAX_REFERENCES, REFERENCE_KINDS
from livestage.models.dit import WanDiT
from livestage.models.kv_cache import ChunkKVCache, CleanHistoryCache, NoisyHistoryCache
from livestage.models.sampler import BackboneSampler, ChunkConditions, RefinerSampler

ReferenceImages = list[tuple[str, torch.Tensor]]  # (kind, image [3, H, W] in [-1, 1])
ReferenceLatents = list[tuple[str, torch.Tensor]]  # (kind, latent [1, C, 1, h, w])


@dataclass
class ChunkInputs:
    """Condition features of one chunk, as produced by the encoder stage."""

    chunk_index: int
    text: torch.Tensor  # [1, Lt, text_dim]
    speak: torch.Tensor  # [1, A, audio_dim]: features of the speak window (2 s history + 1 s)
    listen: torch.Tensor  # [1, A, audio_dim]
    directive: str = ""
    speaking: bool = False  # the speak stream has sound in this chunk
    user_speaking: bool = False  # the listen stream has sound in this chunk

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"text": self.text, "speak": self.speak, "listen": self.listen}


@dataclass
class HistoryEntry:
    """Persistent visual state of one cached chunk: enough to rebuild its K/V on another worker.

    `latent` and `timestep` are the model input the K/V were computed from; `inputs` are the
    chunk's conditions. Checkpointed per chunk for the sinks and the window.
    """

    chunk_index: int
    latent: torch.Tensor
    timestep: float
    inputs: ChunkInputs


class ReferenceKindError(ValueError):
    """A reference set with a bad kind or count; `index` is the offending reference (-1: the set)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def check_reference_kinds(kinds: list[str]) -> None:
    """Exactly one global reference, at most 4 views and 8 expressions, no unknown kinds: the one
    check both the session API (which names the field) and the encoder use."""
    counts: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        if kind not in REFERENCE_KINDS:
            raise ReferenceKindError(i, f"reference kind {kind!r} is not one of {', '.join(REFERENCE_KINDS)}")
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] > MAX_REFERENCES[kind]:
            raise ReferenceKindError(i, f"at most {MAX_REFERENCES[kind]} {kind} reference image(s) are allowed")
    if counts.get("global") != 1:
        raise ReferenceKindError(-1, "exactly one GLOBAL reference image is required")


def validate_references(references: ReferenceImages, height: int, width: int) -> None:
    """Checks kinds, counts (1 global, <=4 views, <=8 expressions) and image shapes."""
    check_reference_kinds([kind for kind, _ in references])
    for kind, image in references:
        if tuple(image.shape) != (3, height, width):
            raise ValueError(f"{kind} reference image must be [3, {height}, {width}], got {tuple(image.shape)}")


class ConditionEncoder:
    """Encoder stage: references, text directives and audio windows to condition tensors."""

    def __init__(self, models: AvatarModels):
        self.models = models
        self.preset = models.preset

    @torch.no_grad()
    def encode_references(self, references: ReferenceImages) -> ReferenceLatents:
        validate_references(references, self.preset.height, self.preset.width)
        out = []
        for kind, image in references:
            img = image.to(self.models.device, self.models.dtype)[None]
            out.append((kind, self.models.vae.encode_image(img)))
        return out

    @torch.no_grad()
    def encode_chunk(self, chunk_index: int, speak_window: np.ndarray | torch.Tensor,
                     listen_window: np.ndarray | torch.Tensor, directive: str = "",
                     silence_rms: float = 1e-3) -> ChunkInputs:
        """Features of one chunk from its 3 s speak/listen windows (samples at the preset rate)."""
        speak = torch.as_tensor(np.asarray(speak_window, dtype=np.float32))
        listen = torch.as_tensor(np.asarray(listen_window, dtype=np.float32))
        expected = self.preset.chunk.samples_per_chunk * (self.preset.chunk.audio_history_chunks + 1)
        for name, w in (("speak", speak), ("listen", listen)):
            if w.dim() != 1 or w.shape[0] != expected:
                raise ValueError(f"{name} window must hold {expected} mono samples, got {tuple(w.shape)}")
        dev, dt = self.models.device, self.models.dtype
        feats = self.models.audio_encoder.extract(torch.stack([speak, listen]).to(dev, dt))
        text = self.models.text_encoder.encode([directive]).to(dev, dt)
        current = slice(expected - self.preset.chunk.samples_per_chunk, expected)
        return ChunkInputs(
            chunk_index=chunk_index, text=text, speak=feats[0:1], listen=feats[1:2],
            directive=directive,
            speaking=bool(speak[current].pow(2).mean().sqrt() > silence_rms),
            user_speaking=bool(listen[current].pow(2).mean().sqrt() > silence_rms),
        )


class EncoderSession:
    """The encoder's copy of one session's speak and listen streams.

    The session runtime sends each stream's new samples once, placed on the session timeline
    (`receive`: what the encoder held from `start_sample` on is replaced, which is how an
    interrupt's cut reaches it); the encoder reads chunk k's 3-s windows from its own copy, so they
    equal the runtime's windows at the time chunk k was requested.
    """

    def __init__(self, encoder: ConditionEncoder):
        self.encoder = encoder
        chunk = encoder.preset.chunk
        self.speak = StreamingAudioWindow.for_chunks(chunk)
        self.listen = StreamingAudioWindow.for_chunks(chunk)
        self.next_chunk_index = 0

    def rollback(self, last_kept_chunk: int) -> None:
        """After an interrupt: the next request is for the chunk after `last_kept_chunk` (the cut
        speech itself arrives with that request's speak slice)."""
        self.next_chunk_index = last_kept_chunk + 1

    def receive(self, stream: str, start_sample: int, samples: np.ndarray) -> None:
        window = self.speak if stream == "speak" else self.listen
        seconds = start_sample / window.sample_rate
        window.drop_after(seconds)
        window.pad_to(seconds)
        window.push(samples)

    def restore(self, stream: str, start_sample: int, samples: np.ndarray) -> None:
        """Starts a stream mid-session from the audio the runtime still holds (failover)."""
        window = self.speak if stream == "speak" else self.listen
        window.restart_at(start_sample)
        window.push(samples)

    def encode(self, chunk_index: int, directive: str, played_chunk: int) -> tuple[ChunkInputs, np.ndarray]:
        """Chunk k's condition features and the 1 s of speech that plays with its frames; then
        forgets audio no window of a chunk from `played_chunk` (the one playing now) on needs."""
        speak = self.speak.window(chunk_index)
        inputs = self.encoder.encode_chunk(chunk_index, speak, self.listen.window(chunk_index), directive)
        keep_from = min(played_chunk, chunk_index)
        self.speak.trim_before(keep_from)
        self.listen.trim_before(keep_from)
        self.next_chunk_index = chunk_index + 1
        return inputs, speak[-self.encoder.preset.chunk.samples_per_chunk:]


class _DiTStageSession:
    """Shared part of the backbone and refiner sessions: cache, references and conditions."""

    cache_class: type[ChunkKVCache] = ChunkKVCache

    def __init__(self, model: WanDiT, models: AvatarModels, seed: int,
                 references: ReferenceLatents, rollback_chunks: int = 0):
        self.model = model
        self.models = models
        self.seed = seed
        p = models.preset
        self.latent_shape = (1, p.vae.z_dim, p.chunk.latent_frames_per_chunk,
                             p.latent_height, p.latent_width)
        geometry = model.cache_geometry(p.latent_height, p.latent_width, rollback_chunks)
        self.cache = self.cache_class(geometry)
        self._tokens_per_frame = geometry.grid_height * geometry.grid_width
        self.references = references
        with torch.no_grad():
            empty = torch.zeros(1, 0, p.dit.text_dim, device=models.device, dtype=models.dtype)
            model.prefill_references(references, model.embed_text(empty), self.cache)
        self._text_key: tuple[str, int] | None = None
        self._text: torch.Tensor | None = None
        self._inputs: dict[int, ChunkInputs] = {}

    def conditions(self, inputs: ChunkInputs) -> ChunkConditions:
        # The directive's embedding is reused until it changes (it changes at chunk boundaries).
        key = (inputs.directive, id(inputs.text))
        if self._text is None or self._text_key != key:
            self._text = self.model.embed_text(inputs.text)
            self._text_key = key
        audio = None
        if self.model.config.audio_dim:
            audio = self.model.audio_context(inputs.speak, inputs.listen,
                                             self.latent_shape[2], self._tokens_per_frame)
        return ChunkConditions(context=self._text, audio=audio)

    def rollback(self, last_kept_chunk: int) -> None:
        """Forgets history newer than `last_kept_chunk` (interrupt discarding lookahead)."""
        self.cache.truncate_after(last_kept_chunk)
        self._prune_inputs()

    def _remember(self, inputs: ChunkInputs) -> None:
        self._inputs[inputs.chunk_index] = inputs
        self._prune_inputs()

    def _prune_inputs(self) -> None:
        kept = {c.chunk_index for c in self.cache.retained()}
        for k in [k for k in self._inputs if k not in kept]:
            del self._inputs[k]

    def history_entries(self) -> list[HistoryEntry]:
        """The sinks and window as checkpointable entries, oldest first."""
        return [HistoryEntry(c.chunk_index, c.latent, c.timestep, self._inputs[c.chunk_index])
                for c in self.cache.history() if c.chunk_index in self._inputs]

    def entry(self, chunk_index: int) -> HistoryEntry | None:
        for c in self.cache.history():
            if c.chunk_index == chunk_index and chunk_index in self._inputs:
                return HistoryEntry(c.chunk_index, c.latent, c.timestep, self._inputs[chunk_index])
        return None

    @torch.no_grad()
    def restore(self, entries: list[HistoryEntry]) -> None:
        """Rebuilds the cache on a new worker by replaying the checkpointed latents in order.

        Sinks come back exactly (each only saw earlier sinks and the references); window chunks
        are recomputed against the sinks and the window chunks before them.
        """
        self.cache.truncate_after(-1)
        for entry in sorted(entries, key=lambda e: e.chunk_index):
            cond = self.conditions(entry.inputs)
            t = torch.full((1,), entry.timestep, device=entry.latent.device)
            out = self.model.forward_chunk(entry.latent.to(self.models.device, self.models.dtype), t,
                                           cond.context, self.cache, cond.audio, capture=True,
                                           chunk_index=entry.chunk_index)
            self.cache.append(out.cached)
            self._remember(entry.inputs)

    @property
    def next_chunk_index(self) -> int:
        last = self.cache.last_chunk_index
        return 0 if last is None else last + 1


class GeneratorSession(_DiTStageSession):
    """Backbone stage state of one session."""

    cache_class = NoisyHistoryCache

    def __init__(self, models: AvatarModels, seed: int, references: ReferenceLatents,
                 rollback_chunks: int = 0):
        super().__init__(models.backbone, models, seed, references, rollback_chunks)
        self.sampler = BackboneSampler(models.backbone, models.preset.sampler)

    @torch.no_grad()
    def generate(self, inputs: ChunkInputs) -> torch.Tensor:
        coarse = self.sampler.generate(self.cache, self.conditions(inputs), self.latent_shape,
                                       self.seed, inputs.chunk_index)
        self._remember(inputs)
        return coarse


class RefinerSession(_DiTStageSession):
    """Refiner stage state of one session."""

    cache_class = CleanHistoryCache

    def __init__(self, models: AvatarModels, seed: int, references: ReferenceLatents,
                 rollback_chunks: int = 0):
        super().__init__(models.refiner, models, seed, references, rollback_chunks)
        self.sampler = RefinerSampler(models.refiner, models.preset.sampler)

    @torch.no_grad()
    def refine(self, inputs: ChunkInputs, coarse: torch.Tensor) -> torch.Tensor:
        clean = self.sampler.refine(self.cache, self.conditions(inputs), coarse, self.seed,
                                    inputs.chunk_index)
        self._remember(inputs)
        return clean


@dataclass
class DecoderSession:
    """Decoder stage state of one session: the VAE's streaming conv cache.

    The conv cache after each of the last `rollback_chunks` chunks is kept, so an interrupt can
    rewind decoding to the chunk that is playing.
    """

    models: AvatarModels
    rollback_chunks: int = 0
    state: object = field(init=False)
    chunks_decoded: int = field(default=0, init=False)
    last_chunk_index: int = field(default=-1, init=False)
    _snapshots: dict[int, object] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.state = self.models.vae.new_decode_state()

    def rollback(self, last_kept_chunk: int) -> None:
        if last_kept_chunk < 0:
            self.state = self.models.vae.new_decode_state()
        elif last_kept_chunk in self._snapshots:
            self.state = copy.deepcopy(self._snapshots[last_kept_chunk])
        elif last_kept_chunk != self.last_chunk_index:
            raise ValueError(f"cannot rewind decoding to chunk {last_kept_chunk}: not retained")
        self._snapshots = {k: v for k, v in self._snapshots.items() if k <= last_kept_chunk}
        self.last_chunk_index = last_kept_chunk

    def _snapshot(self, chunk_index: int) -> None:
        if self.rollback_chunks <= 0:
            return
        self._snapshots[chunk_index] = copy.deepcopy(self.state)
        for k in sorted(self._snapshots)[:-self.rollback_chunks - 1]:
            del self._snapshots[k]

    @torch.no_grad()
    def decode(self, clean: torch.Tensor, chunk_index: int | None = None) -> np.ndarray:
        """Clean latents of one chunk -> uint8 frames [frames_per_chunk, H, W, 3].

        The causal VAE turns the very first latent of a session into a single frame, so the first
        chunk is 3 frames short of a full second; it is padded by holding its first frame, which
        keeps every chunk exactly `frames_per_chunk` long and audio aligned.
        """
        video = self.models.vae.decode_chunk(clean, self.state)  # [1, 3, T, H, W] in [-1, 1]
        frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames = frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()
        want = self.models.preset.chunk.frames_per_chunk
        if frames.shape[0] < want:
            pad = np.repeat(frames[:1], want - frames.shape[0], axis=0)
            frames = np.concatenate([pad, frames], axis=0)
        self.chunks_decoded += 1
        self.last_chunk_index = self.last_chunk_index + 1 if chunk_index is None else chunk_index
        self._snapshot(self.last_chunk_index)
        return frames
