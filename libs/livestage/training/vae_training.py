"""Stage 0a: the causal video VAE (Wan layout, the preset's small width) on rendered clips.

The loss is a reconstruction loss that cares most about what moves: a squared error weighted up
where a pixel differs from the segment's mean frame (mouth, eyes, head outline), an L1 term on
image gradients (keeps edges sharp, the mouth is a few pixels tall), and a small penalty on the
latent magnitude so the latent space stays compact for the diffusion model. A little noise is
added to the latents before decoding (10 % of their spread), so the decoder tolerates the DiT's
imprecise latents.

Segments are 1 + 4k frames from a random point of a clip (the stream-start case the decoder
sees at every session start, then full 4-frame latents), cropped to a random 8-aligned window:
the VAE is convolutional, so crops train the same weights at a fraction of the cost. Three phases:
short segments first (cheap, learns the spatial code), then 17-frame segments, then segments that
start at a random depth into a stream (up to 20 latents of cache warm-up without gradients):
the causal convolutions reach about 20 latents back, and a VAE that only ever saw a few latents
of context decodes the steady state of a real stream with wrong colours (PSNR fell from 27 dB in
the first second to 12-17 dB after it, before this phase existed).

After training, `fit_latent_stats` measures the per-channel mean and std of the latents; they
are set on the VAE (`set_latent_stats`) and shipped in the weights file's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from livestage.models.vae import CausalVideoVAE, VAEEncodeState
from livestage.training.dataset import RenderedDataset, frames_to_tensor
from livestage.training.loop import Stage, cosine_schedule, run_stage


@dataclass
class VAETrainingConfig:
    steps: int = 1900
    batch: int = 8
    latents_per_segment: int = 1  # 1 + 4 = 5 frames: the first-frame latent and one full latent
    crop: int = 64
    lr: float = 5e-4
    stream_steps: int = 900
    """Second phase ("vae_stream"): long segments, so the causal convolutions learn the steady
    state of a stream (their cached context is a full earlier latent, not the first frame)."""
    stream_batch: int = 4
    stream_latents_per_segment: int = 4  # 17 frames
    stream_lr: float = 3e-4
    deep_steps: int = 600
    """Third phase ("vae_deep_stream"): the causal convolutions of the encoder and of the decoder
    each reach about 20 latents back, so a long stream settles into its steady state only after
    some 80 frames, which the short segments never show. Each step starts a stream at a random
    depth: `0..deep_max_warm_latents` latents are encoded and decoded without gradients to fill
    the conv caches, then `deep_latents` more are trained through both halves."""
    deep_batch: int = 4
    deep_max_warm_latents: int = 20
    deep_latents: int = 4
    deep_lr: float = 2e-4
    motion_weight: float = 2.0
    gradient_weight: float = 0.2
    latent_penalty: float = 1e-3
    latent_noise: float = 0.1
    checkpoint_every: int = 100


def init_for_training(vae: CausalVideoVAE) -> None:
    """Zero-initialises the last convolution of every residual branch and the output projection
    of every attention block, so each block starts as the identity. With the Wan layout's
    RMS-normalised blocks at the demo's narrow width, a default initialisation sits on the mean
    image for hundreds of steps; started as identities, the blocks learn structure at once."""
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith(("residual.6.weight", "residual.6.bias", "proj.weight", "proj.bias")):
                param.zero_()


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def reconstruction_loss(rec: torch.Tensor, target: torch.Tensor, motion_weight: float,
                        gradient_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """[B, 3, T, H, W] frames in [-1, 1]; returns the loss and its parts."""
    moving = (target - target.mean(dim=2, keepdim=True)).abs().sum(dim=1, keepdim=True)
    weight = 1.0 + motion_weight * (moving > 0.1).float()
    mse = ((rec - target).pow(2) * weight).mean() / weight.mean()
    gy_r, gx_r = image_gradients(rec)
    gy_t, gx_t = image_gradients(target)
    grad = (gy_r - gy_t).abs().mean() + (gx_r - gx_t).abs().mean()
    return mse + gradient_weight * grad, {"mse": mse.item(), "grad": grad.item()}


def sample_segments(data: RenderedDataset, rng: np.random.Generator, batch: int, frames: int,
                    crop: int, height: int, width: int) -> torch.Tensor:
    out = []
    for _ in range(batch):
        clip = int(rng.integers(len(data)))
        start = int(rng.integers(0, data.frames_per_clip - frames + 1))
        y = int(rng.integers(0, (height - crop) // 8 + 1)) * 8
        x = int(rng.integers(0, (width - crop) // 8 + 1)) * 8
        seg = np.asarray(data.clip_frames(clip)[start:start + frames, y:y + crop, x:x + crop])
        if rng.random() < 0.5:
            seg = seg[:, :, ::-1]  # mirror: faces are roughly symmetric, doubles the data
        out.append(frames_to_tensor(seg))
    return torch.stack(out)


def _with_latent_noise(z: torch.Tensor, config: VAETrainingConfig) -> torch.Tensor:
    """Noise relative to the latents' spread (a fixed signal-to-noise ratio whatever their scale):
    the decoder must cope with the imprecise latents a DiT produces."""
    return z + config.latent_noise * z.detach().std() * torch.randn_like(z)


def _vae_update(vae: CausalVideoVAE, opt: torch.optim.Optimizer, config: VAETrainingConfig,
                video: torch.Tensor, z: torch.Tensor, rec: torch.Tensor) -> dict[str, float]:
    """One optimiser step of every VAE phase: the reconstruction loss plus a small penalty on the
    latents' size, which keeps their scale bounded (the reconstruction loss is blind to it: the latent
    noise is relative to their spread)."""
    loss, parts = reconstruction_loss(rec, video, config.motion_weight, config.gradient_weight)
    penalty = z.pow(2).mean()
    loss = loss + config.latent_penalty * penalty
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return {"loss": loss.item(), **parts, "latent_rms": penalty.sqrt().item()}


def train_vae(vae: CausalVideoVAE, data: RenderedDataset, workdir, config: VAETrainingConfig,
              seed: int = 0, log=print) -> dict:
    """The three phases: short segments from a random start (fast, learns the spatial code), then
    17-frame segments (a few latents into a stream), then latents at any depth into a stream.
    A phase with 0 steps is skipped. Returns the summaries (later phases nested)."""
    summary = _train_vae_phase(vae, data, workdir, config, "vae", config.steps, config.batch,
                               config.latents_per_segment, config.lr, seed, log)
    if config.stream_steps:
        summary["stream"] = _train_vae_phase(vae, data, workdir, config, "vae_stream", config.stream_steps,
                                             config.stream_batch, config.stream_latents_per_segment,
                                             config.stream_lr, seed + 1, log)
    if config.deep_steps:
        summary["deep_stream"] = train_deep_stream(vae, data, workdir, config, seed + 2, log)
    return summary


def train_deep_stream(vae: CausalVideoVAE, data: RenderedDataset, workdir, config: VAETrainingConfig,
                      seed: int = 0, log=print) -> dict:
    """Both halves trained on latents at a random depth into a stream; see
    `VAETrainingConfig.deep_steps`. The warm-up runs through the streaming states
    (`encode_chunk` / `decode_chunk`), exactly as a session does, and keeps no graph."""
    opt = torch.optim.AdamW(vae.parameters(), lr=config.deep_lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng([seed, 19])
    stage = Stage("vae_deep_stream", workdir, {"vae": vae}, {"vae": opt}, config.deep_steps,
                  config.checkpoint_every, lr_schedule=cosine_schedule(config.deep_steps, warmup=20), data_rng=rng)
    tf = vae.config.temporal_factor
    h, w = data.frames.shape[1:3]

    def step(i: int) -> dict[str, float]:
        warm = int(rng.integers(0, config.deep_max_warm_latents + 1))
        video = sample_segments(data, rng, config.deep_batch, 1 + tf * (warm + config.deep_latents - 1),
                                config.crop, h, w)
        encoding, decoding = VAEEncodeState(), vae.new_decode_state()
        first = 1 + tf * (warm - 1) if warm else 0  # the first frame of the trained latents
        if warm:
            with torch.no_grad():
                vae.decode_chunk(_with_latent_noise(vae.encode_chunk(video[:, :, :first], encoding), config),
                                 decoding)
        z = vae.encode_chunk(video[:, :, first:], encoding)
        rec = vae.decode_chunk(_with_latent_noise(z, config), decoding)
        return {**_vae_update(vae, opt, config, video[:, :, first:], z, rec), "depth": float(warm)}

    return run_stage(stage, step, log=log)


def _train_vae_phase(vae: CausalVideoVAE, data: RenderedDataset, workdir, config: VAETrainingConfig,
                     name: str, steps: int, batch: int, latents: int, lr: float, seed: int, log) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng([seed, 17])
    stage = Stage(name, workdir, {"vae": vae}, {"vae": opt}, steps, config.checkpoint_every,
                  lr_schedule=cosine_schedule(steps, warmup=50), data_rng=rng)
    frames = 1 + vae.config.temporal_factor * latents
    h, w = data.frames.shape[1:3]

    def step(i: int) -> dict[str, float]:
        video = sample_segments(data, rng, batch, frames, config.crop, h, w)
        z = vae.encode(video)
        rec = vae.decode(_with_latent_noise(z, config))
        return _vae_update(vae, opt, config, video, z, rec)

    return run_stage(stage, step, log=log)


@torch.no_grad()
def fit_latent_stats(vae: CausalVideoVAE, data: RenderedDataset, clips: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the (un-normalised) latents of a few whole clips."""
    vae.set_latent_stats(torch.zeros(vae.config.z_dim), torch.ones(vae.config.z_dim))
    lead = vae.config.temporal_factor - 1
    zs = []
    for i in np.linspace(0, len(data) - 1, min(clips, len(data))).astype(int):
        zs.append(vae.encode(frames_to_tensor(np.asarray(data.clip_frames(int(i))[lead:]))[None]))
    z = torch.cat([t.transpose(0, 1).reshape(vae.config.z_dim, -1) for t in zs], dim=1)
    return z.mean(dim=1), z.std(dim=1).clamp_min(1e-3)


@torch.no_grad()
def reconstruction_psnr(vae: CausalVideoVAE, frames: np.ndarray) -> float:
    """PSNR (dB) of encode -> decode of whole chunks of uint8 frames."""
    lead = vae.config.temporal_factor - 1
    video = frames_to_tensor(np.asarray(frames[lead:]))[None]
    rec = vae.decode(vae.encode(video)).clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (video + 1) / 2).item()
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))
