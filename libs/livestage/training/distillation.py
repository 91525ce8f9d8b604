"""The four distillation stages: bidirectional teacher -> causal 2-step backbone + 1-step refiner.

All stages train the streaming students through the real streaming code path
(`WanDiT.forward_chunk` against `NoisyHistoryCache` / `CleanHistoryCache`, the sampler's
timesteps), so what is trained is what runs: positions inside the sink + window, pre-RoPE history
keys re-roped at read time, reference tokens prefilled once per session. Gradients flow through
the current chunk and the reference tokens; history K/V are detached (as in Self-Forcing).

- **Stage 1, ODE initialisation.** The teacher generates sequences chunk by chunk (full-step
  ODE with CFG, each chunk continuing the previous one) and its trajectory is read at the
  backbone's timesteps: x(T0) (the noise), x(T1), x0. The backbone, initialised from the teacher's
  weights, regresses x0 from x(T0) and from x(T1), its noisy history written from the teacher's
  x(T1) latents (what its own last step would have seen).
- **Stage 2, off-policy DMD.** Distribution matching: the generator's x0 is re-noised to a random
  level and pushed along (teacher x0 - fake x0), where the fake score is a copy of the teacher
  trained online (flow matching) on the generator's outputs. Off-policy: the generator's inputs
  are teacher-derived (history and T1 inputs are the teacher's latents re-noised). A feature
  regulariser (distance to the teacher's x0 in the VAE decoder's mid-level feature space) keeps
  it from collapsing onto a few modes.
- **Stage 3, on-policy DMD.** The backbone rolls out its own sessions chunk by chunk with its
  noisy-history cache, exactly as at inference; each step takes one more chunk of a batch of
  sessions (a session runs `rollout_chunks` chunks, long enough to fill the sinks and slide the
  window, then starts over on a new clip), with the gradient through one randomly chosen
  denoising step, as in Self-Forcing.
- **Stage 4, refiner DMD.** The refiner (initialised from the backbone) takes the backbone's
  rollouts re-noised to T2 and makes one step to clean against its clean-history cache (written
  from its own refined latents at t=0); DMD against the teacher as above.

The teacher scores a generated chunk in continuation mode: the previous chunk of the same
session, clean, in front of it. A session's first chunk has no previous chunk; it is scored as
the first of a two-chunk window whose second chunk is the data's next chunk at the same noise.

Where this simplifies the seed recipe (at the demo scale, two CPU cores): rollout sessions
advance one chunk per step, so their history was written by slightly older weights (a few
steps); one critic update per generator update; no EMA of the generator.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from livestage.models.config import ModelPreset
from livestage.models.dit import WanDiT
from livestage.models.kv_cache import CachedChunk, ChunkKVCache, CleanHistoryCache, NoisyHistoryCache
from livestage.models.sampler import BackboneSampler, ChunkConditions, FlowMatchSchedule, RefinerSampler
from livestage.models.vae import CausalVideoVAE
from livestage.training.conditions import ConditionBuilder, Window, reference_subset
from livestage.training.loop import Stage, cosine_schedule, run_stage
from livestage.training.teacher import (
    ClipConditions,
    TeacherSampler,
    clip_conditions,
    clip_flow,
    reference_views,
)
from livestage.training.teacher_training import sample_sigma


TEACHER_STEPS = 20
"""Euler steps the teacher samples with (CFG doubles its network evaluations): its "full steps".
The first shipped run used 16; the public avatar teachers use 50."""


@dataclass
class DistillationConfig:
    batch: int = 4
    sequences: int = 48
    sequence_chunks: int = 8
    teacher_steps: int = TEACHER_STEPS
    guidance: float = 3.0
    stage1_steps: int = 500
    stage2_steps: int = 300
    stage3_steps: int = 320
    stage4_steps: int = 240
    lr: float = 1e-4
    critic_lr: float = 2e-4
    feature_weight: float = 0.5
    dmd_sigma_shift: float = 3.0
    rollout_chunks: int = 8
    checkpoint_every: int = 20


def detached(chunk: CachedChunk) -> CachedChunk:
    return CachedChunk(chunk.chunk_index, [k.detach() for k in chunk.keys], [v.detach() for v in chunk.values],
                       chunk.latent.detach(), chunk.timestep)


def history_chunks(k: int, sinks: int, window: int) -> list[int]:
    """Chunks whose K/V a cache holds when chunk k is generated: the sinks and the window."""
    return sorted({*range(min(k, sinks)), *range(max(sinks, k - window), k)})


@dataclass
class ChunkContext:
    """Per-chunk conditions of a batch of sessions, in the student's and the teacher's forms."""

    windows: list[Window]
    texts: list[str]
    student: ChunkConditions


class StudentConditions:
    """Builds the streaming conditions of chunk k for a batch of clips (frozen encoders)."""

    def __init__(self, builder: ConditionBuilder, latent_hw: tuple[int, int]):
        self.builder = builder
        self.latent_hw = latent_hw

    @torch.no_grad()
    def features(self, clips: list[int], k: int) -> tuple[list[Window], torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        windows = [Window(c, k, 1) for c in clips]
        speak, listen = self.builder.audio_features(windows)
        texts = self.builder.directives(windows)
        return windows, speak, listen, self.builder.text(texts), texts

    def for_model(self, model: WanDiT, clips: list[int], k: int) -> ChunkContext:
        windows, speak, listen, text, texts = self.features(clips, k)
        _, ph, pw = model.config.patch_size
        tpf = (self.latent_hw[0] // ph) * (self.latent_hw[1] // pw)
        lpc = self.builder.preset.chunk.latent_frames_per_chunk
        audio = model.audio_context(speak, listen, lpc, tpf, batch=len(clips))
        return ChunkContext(windows, texts, ChunkConditions(model.embed_text(text), audio))


class TeacherScoring:
    """Teacher (real) and fake-critic predictions on a generated chunk, in a two-chunk window."""

    def __init__(self, teacher: WanDiT, fake: WanDiT, builder: ConditionBuilder, schedule: FlowMatchSchedule,
                 guidance: float, latent_hw: tuple[int, int], sigma_shift: float):
        self.teacher, self.fake = teacher, fake
        self.builder = builder
        self.sampler = TeacherSampler(teacher, schedule, steps=1, guidance=guidance)
        self.latent_hw = latent_hw
        self.sigma_shift = sigma_shift
        self.lpc = builder.preset.chunk.latent_frames_per_chunk

    def window_conditions(self, model: WanDiT, clips: list[int], k: int, refs, drop: bool = False) -> ClipConditions:
        """Conditions of the window [k-1, k] (or [0, 1] for k = 0); `drop` = unconditional."""
        first = max(k - 1, 0)
        windows = [Window(c, first, 2) for c in clips]
        with torch.no_grad():
            speak, listen = self.builder.audio_features(windows)
            texts = [self.builder.data.directives[c][k] for c in clips]
            text = self.builder.text(["" if drop else t for t in texts])
        if drop:
            speak, listen = speak * 0, listen * 0
        views = reference_views(model, refs, self.latent_hw, len(clips))
        return clip_conditions(model, text, speak, listen, views, 2, self.latent_hw)

    def _window(self, x_t: torch.Tensor, sigma: float, k: int, previous: torch.Tensor | None,
                partner: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """The window's latents, per-frame sigmas and where the generated chunk sits in it."""
        b = x_t.shape[0]
        lpc = self.lpc
        if k > 0:
            assert previous is not None
            full = torch.cat([previous, x_t], dim=2)
            sig = torch.cat([torch.zeros(b, lpc), torch.full((b, lpc), sigma)], dim=1)
            return full, sig, slice(lpc, 2 * lpc)
        assert partner is not None
        noisy_partner = (1 - sigma) * partner + sigma * torch.randn_like(partner)
        return torch.cat([x_t, noisy_partner], dim=2), torch.full((b, 2 * lpc), sigma), slice(0, lpc)

    def dmd_loss(self, x0: torch.Tensor, clips: list[int], k: int, refs, previous: torch.Tensor | None,
                 partner: torch.Tensor | None, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The DMD generator loss for generated x0 [B, C, 6, h, w] of chunk k."""
        sigma = float(sample_sigma(rng, 1, self.sigma_shift, 0.02, 0.98)[0])
        noise = torch.randn_like(x0)
        x_t = ((1 - sigma) * x0 + sigma * noise).detach()
        with torch.no_grad():
            full, sig, where = self._window(x_t, sigma, k, previous, partner)
            cond = self.window_conditions(self.teacher, clips, k, refs)
            uncond = self.window_conditions(self.teacher, clips, k, refs, drop=True)
            real = full[:, :, where] - sigma * self.sampler.guided_flow(full, sig, cond, uncond)[:, :, where]
            fcond = self.window_conditions(self.fake, clips, k, refs)
            fake = full[:, :, where] - sigma * clip_flow(self.fake, full, sig, fcond)[:, :, where]
            normaliser = (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-4)
            grad = torch.nan_to_num((fake - real) / normaliser)
        loss = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
        return loss, {"dmd": loss.item(), "sigma": sigma, "gap_to_teacher": normaliser.mean().item()}

    def critic_loss(self, x0: torch.Tensor, clips: list[int], k: int, refs, previous: torch.Tensor | None,
                    partner: torch.Tensor | None, rng: np.random.Generator) -> torch.Tensor:
        """Flow matching of the fake score on the generator's (detached) outputs."""
        x0 = x0.detach()
        sigma = float(sample_sigma(rng, 1, self.sigma_shift, 0.02, 0.98)[0])
        noise = torch.randn_like(x0)
        x_t = (1 - sigma) * x0 + sigma * noise
        full, sig, where = self._window(x_t, sigma, k, previous, partner)
        fcond = self.window_conditions(self.fake, clips, k, refs)
        flow = clip_flow(self.fake, full, sig, fcond)[:, :, where]
        return F.mse_loss(flow, noise - x0)


def decoder_features(vae: CausalVideoVAE, latent: torch.Tensor) -> torch.Tensor:
    """Mid-level features of the (frozen) VAE decoder at latent resolution: the feature space
    of the stage-2 regulariser (what the decoder makes of a latent, before upsampling)."""
    mean, std = vae._stats(latent)
    x = vae.conv2(latent * std + mean)
    tails: dict = {}
    x = vae.decoder.conv1(x, tails)
    for layer in vae.decoder.middle:
        x = layer(x, tails)
    return x


# -- Stage 1 data: teacher trajectories ---------------------------------------------------------


@dataclass
class TeacherSequences:
    """Teacher-generated sequences: noise, x(T1) and x0 per chunk, and the clips they follow."""

    clips: list[int] = field(default_factory=list)
    noise: list[torch.Tensor] = field(default_factory=list)  # each [L, C, 6, h, w] float16
    at_t1: list[torch.Tensor] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)

    def save(self, path: Path) -> None:
        torch.save({"clips": self.clips, "noise": self.noise, "at_t1": self.at_t1, "clean": self.clean}, path)

    @classmethod
    def load(cls, path: Path) -> "TeacherSequences":
        if not path.is_file():
            return cls()
        d = torch.load(path, weights_only=False)
        return cls(d["clips"], d["noise"], d["at_t1"], d["clean"])

    def batch(self, idx: list[int], field_name: str, k: int) -> torch.Tensor:
        return torch.stack([getattr(self, field_name)[i][k] for i in idx]).float()


ALL_REFERENCES = list(range(6))


@torch.no_grad()
def generate_teacher_sequences(teacher: WanDiT, builder: ConditionBuilder, config: DistillationConfig,
                               latent_hw: tuple[int, int], path: Path, seed: int = 0, log=print) -> TeacherSequences:
    """Chunk-wise continuation with the teacher; resumable (appends batches to `path`)."""
    seqs = TeacherSequences.load(path)
    preset = builder.preset
    schedule = FlowMatchSchedule(preset.sampler)
    sampler = TeacherSampler(teacher, schedule, config.teacher_steps, config.guidance)
    t1 = schedule.sigma(preset.sampler.backbone_timesteps[1])
    lpc = preset.chunk.latent_frames_per_chunk
    rng = np.random.default_rng([seed, 41])
    n_clips = len(builder.data.identity)
    order = rng.permutation(n_clips).tolist() * (config.sequences // n_clips + 1)
    z, (h, w) = preset.vae.z_dim, latent_hw
    while len(seqs.clips) < config.sequences:
        clips = order[len(seqs.clips):len(seqs.clips) + config.batch]
        b = len(clips)
        refs = builder.references([Window(c, 0, 1) for c in clips], ALL_REFERENCES)
        views = reference_views(teacher, refs, latent_hw, b)
        noise, at_t1, clean = [], [], []
        k = 0
        while k < config.sequence_chunks:
            joint = k == 0
            chunks = 2 if joint else 1
            first = 0 if joint else k - 1
            windows = [Window(c, first, 2) for c in clips]
            speak, listen = builder.audio_features(windows)
            texts = [builder.data.directives[c][first + 1] for c in clips]
            cond = clip_conditions(teacher, builder.text(texts), speak, listen, views, 2, latent_hw)
            uncond = clip_conditions(teacher, builder.text([""] * b), speak * 0, listen * 0, views, 2, latent_hw)
            n = torch.randn(b, z, lpc * chunks, h, w)
            out = sampler.sample(n, cond, uncond, context=None if joint else clean[-1], record=(t1,))
            for j in range(chunks):
                part = slice(j * lpc, (j + 1) * lpc)
                noise.append(n[:, :, part])
                at_t1.append(out.states[t1][:, :, part])
                clean.append(out.clean[:, :, part])
            k += chunks
        for i, c in enumerate(clips):
            seqs.clips.append(c)
            seqs.noise.append(torch.stack([x[i] for x in noise]).half())
            seqs.at_t1.append(torch.stack([x[i] for x in at_t1]).half())
            seqs.clean.append(torch.stack([x[i] for x in clean]).half())
        seqs.save(path)
        log(f"[teacher-sequences] {len(seqs.clips)}/{config.sequences}")
    return seqs


# -- the stages -----------------------------------------------------------------------------------


class _Students:
    """Shared plumbing of the student stages: caches, history replay, timesteps."""

    def __init__(self, preset: ModelPreset, builder: ConditionBuilder, latent_hw: tuple[int, int]):
        self.preset = preset
        self.builder = builder
        self.latent_hw = latent_hw
        self.schedule = FlowMatchSchedule(preset.sampler)
        self.conditions = StudentConditions(builder, latent_hw)
        self.t0, self.t1 = preset.sampler.backbone_timesteps
        self.sigma0, self.sigma1 = self.schedule.sigma(self.t0), self.schedule.sigma(self.t1)

    def t(self, timestep: float, b: int) -> torch.Tensor:
        return torch.full((b,), self.schedule.model_timestep(timestep))

    def new_cache(self, model: WanDiT, cls: type[ChunkKVCache], refs) -> ChunkKVCache:
        cache = cls(model.cache_geometry(*self.latent_hw))
        self.prefill(model, cache, refs)
        return cache

    def prefill(self, model: WanDiT, cache: ChunkKVCache, refs) -> None:
        b = refs[0][1].shape[0]
        empty = torch.zeros(b, 0, model.config.text_dim)
        model.prefill_references(refs, model.embed_text(empty), cache)

    @torch.no_grad()
    def replay_history(self, model: WanDiT, cache: ChunkKVCache, clips: list[int], k: int,
                       latent_of, timestep: float) -> None:
        """Fills the cache as it is when chunk k is generated, from given history latents."""
        c = self.preset.chunk
        for j in history_chunks(k, c.sink_chunks, c.window_chunks):
            cond = self.conditions.for_model(model, clips, j).student
            out = model.forward_chunk(latent_of(j), self.t(timestep, len(clips)), cond.context, cache,
                                      cond.audio, capture=True, chunk_index=j)
            cache.append(detached(out.cached))

    def x0(self, model: WanDiT, x: torch.Tensor, timestep: float, cond: ChunkConditions,
           cache: ChunkKVCache, capture: bool = False, chunk_index: int = -1):
        out = model.forward_chunk(x, self.t(timestep, x.shape[0]), cond.context, cache, cond.audio,
                                  capture=capture, chunk_index=chunk_index)
        return x - self.schedule.sigma(timestep) * out.flow, out.cached


def train_ode_init(backbone: WanDiT, seqs: TeacherSequences, students: _Students, workdir,
                   config: DistillationConfig, seed: int = 0, log=print) -> dict:
    """Stage 1: regression onto the teacher's ODE trajectories at the backbone's timesteps."""
    opt = torch.optim.AdamW(backbone.parameters(), lr=config.lr * 2, weight_decay=0.0)
    rng = np.random.default_rng([seed, 51])
    stage = Stage("stage1_ode", workdir, {"backbone": backbone}, {"backbone": opt}, config.stage1_steps,
                  config.checkpoint_every, lr_schedule=cosine_schedule(config.stage1_steps, warmup=20, floor=0.3),
                  data_rng=rng)
    builder = students.builder

    def step(i: int) -> dict[str, float]:
        idx = rng.choice(len(seqs.clips), size=config.batch, replace=False).tolist()
        clips = [seqs.clips[j] for j in idx]
        k = int(rng.integers(config.sequence_chunks))
        refs = builder.references([Window(c, 0, 1) for c in clips], ALL_REFERENCES)
        cache = students.new_cache(backbone, NoisyHistoryCache, refs)
        students.replay_history(backbone, cache, clips, k, lambda j: seqs.batch(idx, "at_t1", j), students.t1)
        cond = students.conditions.for_model(backbone, clips, k).student
        target = seqs.batch(idx, "clean", k)
        pred0, _ = students.x0(backbone, seqs.batch(idx, "noise", k), students.t0, cond, cache)
        pred1, _ = students.x0(backbone, seqs.batch(idx, "at_t1", k), students.t1, cond, cache)
        l0, l1 = F.mse_loss(pred0, target), F.mse_loss(pred1, target)
        loss = l0 + l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "step_T0": l0.item(), "step_T1": l1.item()}

    return run_stage(stage, step, log=log)


def _critic_update(scoring: TeacherScoring, critic_opt, x0, clips, k, refs, previous, partner, rng) -> float:
    loss = scoring.critic_loss(x0, clips, k, refs, previous, partner, rng)
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(scoring.fake.parameters(), 1.0)
    critic_opt.step()
    return loss.item()


def _partner(builder: ConditionBuilder, clips: list[int]) -> torch.Tensor:
    """The data's chunk 1 of each clip: the second half of chunk 0's scoring window."""
    return builder.latents([Window(c, 1, 1) for c in clips])


def _dmd_stage(name: str, student_name: str, student: WanDiT, scoring: TeacherScoring, steps: int,
               workdir, config: DistillationConfig,
               rng: np.random.Generator) -> tuple[Stage, torch.optim.Optimizer, torch.optim.Optimizer]:
    """A DMD stage's checkpointed state: the student and the fake-score critic, each with its optimiser
    (no first-moment momentum: the DMD direction changes as the critic moves)."""
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.0, 0.99))
    critic_opt = torch.optim.AdamW(scoring.fake.parameters(), lr=config.critic_lr, weight_decay=0.0, betas=(0.0, 0.99))
    stage = Stage(name, workdir, {student_name: student, "fake": scoring.fake},
                  {student_name: opt, "fake": critic_opt}, steps, config.checkpoint_every, data_rng=rng)
    return stage, opt, critic_opt


def train_offpolicy_dmd(backbone: WanDiT, scoring: TeacherScoring, vae: CausalVideoVAE, seqs: TeacherSequences,
                        students: _Students, workdir, config: DistillationConfig, seed: int = 0, log=print) -> dict:
    """Stage 2: DMD with teacher-derived inputs, plus the decoder-feature regulariser."""
    rng = np.random.default_rng([seed, 61])
    stage, opt, critic_opt = _dmd_stage("stage2_dmd_offpolicy", "backbone", backbone, scoring, config.stage2_steps, workdir, config, rng)
    builder = students.builder
    vae.requires_grad_(False)

    def step(i: int) -> dict[str, float]:
        idx = rng.choice(len(seqs.clips), size=config.batch, replace=False).tolist()
        clips = [seqs.clips[j] for j in idx]
        k = int(rng.integers(config.sequence_chunks))
        refs = builder.references([Window(c, 0, 1) for c in clips], reference_subset(rng))
        cache = students.new_cache(backbone, NoisyHistoryCache, refs)
        students.replay_history(backbone, cache, clips, k, lambda j: seqs.batch(idx, "at_t1", j), students.t1)
        cond = students.conditions.for_model(backbone, clips, k).student
        target = seqs.batch(idx, "clean", k)
        if rng.random() < 0.5:
            x0, _ = students.x0(backbone, seqs.batch(idx, "noise", k), students.t0, cond, cache)
        else:  # the second step, on the teacher's x0 re-noised to T1
            x_t1 = (1 - students.sigma1) * target + students.sigma1 * torch.randn_like(target)
            x0, _ = students.x0(backbone, x_t1, students.t1, cond, cache)
        previous = seqs.batch(idx, "clean", k - 1) if k > 0 else None
        partner = seqs.batch(idx, "clean", 1) if k == 0 else None
        dmd, parts = scoring.dmd_loss(x0, clips, k, refs, previous, partner, rng)
        feature = F.mse_loss(decoder_features(vae, x0), decoder_features(vae, target))
        loss = dmd + config.feature_weight * feature
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        opt.step()
        critic = _critic_update(scoring, critic_opt, x0, clips, k, refs, previous, partner, rng)
        return {**parts, "feature": feature.item(), "critic": critic}

    return run_stage(stage, step, log=log)


@dataclass
class RolloutBatch:
    """A batch of sessions advancing in lockstep, one chunk per training step."""

    clips: list[int]
    refs: list
    k: int = 0
    backbone_cache: ChunkKVCache | None = None
    refiner_cache: ChunkKVCache | None = None
    previous: torch.Tensor | None = None


def _new_rollout(builder: ConditionBuilder, rng: np.random.Generator, batch: int) -> RolloutBatch:
    clips = rng.choice(len(builder.data.identity), size=batch, replace=False).tolist()
    refs = builder.references([Window(c, 0, 1) for c in clips], reference_subset(rng))
    return RolloutBatch(clips, refs)


def _rollout_dmd_update(student: WanDiT, opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer,
                        scoring: TeacherScoring, builder: ConditionBuilder, x0: torch.Tensor, r: RolloutBatch,
                        rng: np.random.Generator) -> tuple[dict[str, float], float]:
    """One generator step along the DMD direction for a rollout's chunk, then one critic step on
    the same output."""
    partner = _partner(builder, r.clips) if r.k == 0 else None
    dmd, parts = scoring.dmd_loss(x0, r.clips, r.k, r.refs, r.previous, partner, rng)
    opt.zero_grad(set_to_none=True)
    dmd.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    critic = _critic_update(scoring, critic_opt, x0, r.clips, r.k, r.refs, r.previous, partner, rng)
    return parts, critic


def train_onpolicy_dmd(backbone: WanDiT, scoring: TeacherScoring, students: _Students, workdir,
                       config: DistillationConfig, seed: int = 0, log=print) -> dict:
    """Stage 3: DMD on the backbone's own autoregressive rollouts (noisy-history caches)."""
    rng = np.random.default_rng([seed, 71])
    stage, opt, critic_opt = _dmd_stage("stage3_dmd_onpolicy", "backbone", backbone, scoring, config.stage3_steps, workdir, config, rng)
    builder = students.builder
    state: dict[str, RolloutBatch | None] = {"rollout": None}

    def step(i: int) -> dict[str, float]:
        r = state["rollout"]
        if r is None or r.k >= config.rollout_chunks:
            r = state["rollout"] = _new_rollout(builder, rng, config.batch)
            r.backbone_cache = NoisyHistoryCache(backbone.cache_geometry(*students.latent_hw))
        cache = r.backbone_cache
        assert cache is not None
        students.prefill(backbone, cache, r.refs)  # with the current weights, differentiable
        cond = students.conditions.for_model(backbone, r.clips, r.k).student
        shape = (config.batch, students.preset.vae.z_dim, students.preset.chunk.latent_frames_per_chunk,
                 *students.latent_hw)
        noise = torch.randn(shape)
        grad_step = int(rng.integers(2))
        with torch.set_grad_enabled(grad_step == 0):
            x0_a, _ = students.x0(backbone, noise, students.t0, cond, cache)
        x_t1 = (1 - students.sigma1) * x0_a.detach() + students.sigma1 * torch.randn(shape)
        with torch.set_grad_enabled(grad_step == 1):
            x0_b, captured = students.x0(backbone, x_t1, students.t1, cond, cache, capture=True, chunk_index=r.k)
        out = x0_a if grad_step == 0 else x0_b
        parts, critic = _rollout_dmd_update(backbone, opt, critic_opt, scoring, builder, out, r, rng)
        assert captured is not None
        cache.append(detached(captured))
        r.previous = x0_b.detach()
        r.k += 1
        return {**parts, "critic": critic, "chunk": r.k - 1}

    return run_stage(stage, step, log=log)


def train_refiner_dmd(backbone: WanDiT, refiner: WanDiT, scoring: TeacherScoring, students: _Students, workdir,
                      config: DistillationConfig, seed: int = 0, log=print) -> dict:
    """Stage 4: the 1-step refiner from T2 on re-noised backbone rollouts, clean-history caches."""
    rng = np.random.default_rng([seed, 81])
    stage, opt, critic_opt = _dmd_stage("stage4_refiner", "refiner", refiner, scoring, config.stage4_steps, workdir, config, rng)
    builder = students.builder
    preset = students.preset
    backbone_sampler = BackboneSampler(backbone, preset.sampler)
    refiner_sampler = RefinerSampler(refiner, preset.sampler)
    t2 = preset.sampler.refiner_timestep
    sigma2 = students.schedule.sigma(t2)
    backbone.requires_grad_(False)
    state: dict[str, RolloutBatch | None] = {"rollout": None}

    def step(i: int) -> dict[str, float]:
        r = state["rollout"]
        if r is None or r.k >= config.rollout_chunks:
            r = state["rollout"] = _new_rollout(builder, rng, config.batch)
            with torch.no_grad():
                r.backbone_cache = students.new_cache(backbone, NoisyHistoryCache, r.refs)
            r.refiner_cache = CleanHistoryCache(refiner.cache_geometry(*students.latent_hw))
        assert r.backbone_cache is not None and r.refiner_cache is not None
        shape = (config.batch, preset.vae.z_dim, preset.chunk.latent_frames_per_chunk, *students.latent_hw)
        with torch.no_grad():
            bcond = students.conditions.for_model(backbone, r.clips, r.k).student
            coarse = backbone_sampler.generate(r.backbone_cache, bcond, shape, int(rng.integers(1 << 30)), r.k)
        students.prefill(refiner, r.refiner_cache, r.refs)
        rcond = students.conditions.for_model(refiner, r.clips, r.k).student
        x_t2 = (1 - sigma2) * coarse + sigma2 * torch.randn_like(coarse)
        refined, _ = students.x0(refiner, x_t2, t2, rcond, r.refiner_cache)
        parts, critic = _rollout_dmd_update(refiner, opt, critic_opt, scoring, builder, refined, r, rng)
        with torch.no_grad():
            rcond = students.conditions.for_model(refiner, r.clips, r.k).student
            refiner_sampler.write_history(r.refiner_cache, rcond, refined.detach(), r.k)
        r.previous = refined.detach()
        r.k += 1
        return {**parts, "critic": critic, "coarse_to_refined": (refined - coarse).abs().mean().item()}

    return run_stage(stage, step, log=log)


def make_fake_critic(teacher: WanDiT) -> WanDiT:
    fake = copy.deepcopy(teacher)
    fake.requires_grad_(True)
    return fake
