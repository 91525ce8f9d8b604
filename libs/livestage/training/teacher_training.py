"""Stage 0b: the bidirectional teacher DiT (flow matching, CFG dropout), with the audio and text
encoders it conditions on.

Each step draws windows of two consecutive chunks. Half of them (and every window whose
directive changes between its chunks) put the first chunk at sigma 0 as clean context and train
only on the second: that is the continuation mode the teacher generates long videos with and
scores the causal students in. The rest noise both chunks to one level. Noise levels follow the
shifted distribution sigma = k u / (1 + (k-1) u) with u uniform, like the sampler's grid.

Latent frames that show a nod or a smile weigh up to 1 + `behaviour_weight` times more in the
loss: the listening behaviour is a few pixels of a 128-pixel face, and unweighted it is the
last thing the teacher learns.

The audio encoder (log-mel + learned projection) and the hashed-word text encoder are trained
here together with the teacher and frozen for the distillation stages, which need the teacher's
conditions to mean what they meant when it learned them; they are what the students ship with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from livestage.models.dit import WanDiT
from livestage.training.conditions import ConditionBuilder, reference_subset
from livestage.training.loop import Stage, cosine_schedule, run_stage
from livestage.training.teacher import clip_conditions, clip_flow, reference_views


@dataclass
class TeacherTrainingConfig:
    steps: int = 3000
    batch: int = 4
    chunks: int = 2
    lr: float = 4e-4
    context_prob: float = 0.5
    drop_text_prob: float = 0.15
    drop_audio_prob: float = 0.1
    sigma_shift: float = 3.0
    behaviour_weight: float = 3.0
    """Extra loss weight of latent frames that show a nod or a smile (1 + this x strength)."""
    checkpoint_every: int = 100


def init_for_training(teacher: WanDiT) -> None:
    """Zero-initialises the output projection (`head.head`): the teacher starts by predicting a
    zero flow instead of a random one, which removes a large initial loss the blocks would
    otherwise spend their first steps undoing."""
    with torch.no_grad():
        teacher.head.head.weight.zero_()
        teacher.head.head.bias.zero_()


def sample_sigma(rng: np.random.Generator, n: int, shift: float, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    u = rng.uniform(low, high, n)
    return shift * u / (1 + (shift - 1) * u)


def train_teacher(teacher: WanDiT, builder: ConditionBuilder, workdir, config: TeacherTrainingConfig,
                  latent_hw: tuple[int, int], seed: int = 0, log=print) -> dict:
    audio_encoder, text_encoder = builder.audio_encoder, builder.text_encoder
    params = [*teacher.parameters(), *audio_encoder.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01, betas=(0.9, 0.99))
    rng = np.random.default_rng([seed, 29])
    stage = Stage("teacher", workdir, {"teacher": teacher, "audio_encoder": audio_encoder,
                                       "text_encoder": text_encoder}, {"teacher": opt},
                  config.steps, config.checkpoint_every, lr_schedule=cosine_schedule(config.steps, warmup=100),
                  data_rng=rng)
    lpc = builder.preset.chunk.latent_frames_per_chunk

    def step(i: int) -> dict[str, float]:
        b, chunks = config.batch, config.chunks
        windows = builder.sample_windows(rng, b, chunks)
        x0 = builder.latents(windows)
        speak, listen = builder.audio_features(windows)
        keep_audio = torch.from_numpy((rng.random(b) >= config.drop_audio_prob).astype(np.float32))
        speak, listen = speak * keep_audio[:, None, None], listen * keep_audio[:, None, None]
        texts = [("" if rng.random() < config.drop_text_prob else t) for t in builder.directives(windows)]
        refs = builder.references(windows, reference_subset(rng))
        views = reference_views(teacher, refs, latent_hw, b)
        cond = clip_conditions(teacher, builder.text(texts), speak, listen, views, chunks, latent_hw)
        sigma = torch.from_numpy(sample_sigma(rng, b, config.sigma_shift)).float()
        frames = torch.ones(b, lpc * chunks) * sigma[:, None]
        for j, w in enumerate(windows):
            if rng.random() < config.context_prob or builder.directive_varies(w):
                frames[j, :lpc * (chunks - 1)] = 0.0
        noise = torch.randn_like(x0)
        s = frames[:, None, :, None, None]
        x_t = (1 - s) * x0 + s * noise
        flow = clip_flow(teacher, x_t, frames, cond)
        per_frame = (flow - (noise - x0)).pow(2).mean(dim=(1, 3, 4))  # [B, F]
        mask = (frames > 0).float() * (1.0 + config.behaviour_weight * builder.behaviour(windows))
        loss = (per_frame * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.item()}

    return run_stage(stage, step, log=log)
