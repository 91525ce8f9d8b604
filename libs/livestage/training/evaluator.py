"""A small face evaluator trained on the renderer's ground truth: the lip reader of the report.

From a 128x128 frame it reads the mouth openness (the renderer's `mouth_open`, 0..1), the head
pose and smile (the renderer's yaw, pitch and smile: what listening behaviour moves) and an
identity embedding (the penultimate layer of an identity classifier over the training
identities). It learns from rendered frames and from the same frames passed through the trained
VAE, so it reads the model's decoded output as well as clean renders. Lip sync is then "does the
mouth the evaluator sees follow the loudness of the speech", identity stability "how far the
embedding of a generated frame is from the embedding of the reference portrait", listening
"does the head nod and the face smile when the user talks" (read as pose, not as pixel change,
so a generator's flicker does not count as motion).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from livestage.models.vae import CausalVideoVAE
from livestage.training.dataset import RenderedDataset, frames_to_tensor, tensor_to_frames


POSE_SCALE = np.array([30.0, 20.0, 1.0], np.float32)  # yaw, pitch (degrees), smile -> about -1..1


class FaceReading(NamedTuple):
    """What the evaluator reads from T frames."""

    mouth: np.ndarray  # [T] openness, 0..1
    embedding: np.ndarray  # [T, E] unit identity embeddings
    pose: np.ndarray  # [T, 3] yaw (degrees), pitch (degrees), smile (0..1)


class FaceEvaluator(nn.Module):
    def __init__(self, identities: int, embedding: int = 32):
        super().__init__()
        chans = [3, 16, 32, 48, 64, 64]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(4, b), nn.SiLU()]
        self.features = nn.Sequential(*layers)  # 128 -> 4
        self.embed = nn.Linear(64 * 16, embedding)
        self.mouth = nn.Sequential(nn.Linear(64 * 16, 64), nn.SiLU(), nn.Linear(64, 1))
        self.pose = nn.Sequential(nn.Linear(64 * 16, 64), nn.SiLU(), nn.Linear(64, 3))
        self.identity = nn.Linear(embedding, identities)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """frames [B, 3, H, W] in [-1, 1] (resized to 128) -> (mouth openness [B], embedding [B, E],
        pose [B, 3] scaled by `POSE_SCALE`)."""
        if frames.shape[-2:] != (128, 128):
            frames = F.interpolate(frames, size=(128, 128), mode="bilinear", align_corners=False)
        h = self.features(frames)
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.mouth(h).squeeze(-1), F.normalize(self.embed(h), dim=-1), self.pose(h)

    @torch.no_grad()
    def read(self, frames: np.ndarray, batch: int = 64) -> FaceReading:
        """uint8 frames [T, H, W, 3] -> mouth openness, identity embeddings, head pose and smile."""
        self.eval()
        mouths, embs, poses = [], [], []
        for i in range(0, len(frames), batch):
            x = frames_to_tensor(np.asarray(frames[i:i + batch])).permute(1, 0, 2, 3)
            m, e, p = self(x)
            mouths.append(m.numpy())
            embs.append(e.numpy())
            poses.append(p.numpy() * POSE_SCALE)
        return FaceReading(np.concatenate(mouths), np.concatenate(embs), np.concatenate(poses))


def _vae_roundtrip(vae: CausalVideoVAE, frames: np.ndarray) -> np.ndarray:
    lead = vae.config.temporal_factor - 1
    with torch.no_grad():
        video = frames_to_tensor(np.asarray(frames[lead:]))[None]
        rec = vae.decode(vae.encode(video))[0]
    return np.concatenate([np.asarray(frames[:lead]), tensor_to_frames(rec)])


def train_evaluator(data: RenderedDataset, vae: CausalVideoVAE | None, path: Path, steps: int = 1500,
                    batch: int = 32, seed: int = 0, log=print) -> FaceEvaluator:
    """Trains (or loads from `path`) the evaluator on the rendered clips (+ their VAE round trips)."""
    identities = len(data.identity_seeds)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same evaluator for the same data, whatever ran before
        model = FaceEvaluator(identities)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path))
            return model.eval()
        except RuntimeError as exc:  # an evaluator saved by an older layout: train a new one
            log(f"[evaluator] {path} does not fit the current evaluator ({str(exc).splitlines()[0]}); retraining")
    rng = np.random.default_rng([seed, 91])
    # a bank of VAE round trips: the evaluator must read decoded frames too
    recon: dict[int, np.ndarray] = {}
    if vae is not None:
        for clip in rng.choice(len(data), size=min(24, len(data)), replace=False):
            recon[int(clip)] = _vae_roundtrip(vae, data.clip_frames(int(clip)))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    ids = torch.tensor([c["identity"] for c in data.clips])
    model.train()
    for i in range(steps):
        clips = rng.integers(len(data), size=batch)
        frames_idx = rng.integers(data.frames_per_clip, size=batch)
        imgs, mouth, pose = [], [], []
        for c, f in zip(clips, frames_idx):
            src = recon.get(int(c)) if (int(c) in recon and rng.random() < 0.5) else None
            imgs.append(np.asarray(src[f] if src is not None else data.clip_frames(int(c))[f]))
            mouth.append(data.mouth_open[int(c), int(f)])
            pose.append(data.motion[int(c), int(f)] / POSE_SCALE)
        x = frames_to_tensor(np.stack(imgs)).permute(1, 0, 2, 3)
        pred, emb, pred_pose = model(x)
        loss_m = F.mse_loss(pred, torch.tensor(mouth))
        loss_p = F.mse_loss(pred_pose, torch.from_numpy(np.stack(pose)))
        loss_i = F.cross_entropy(model.identity(emb) * 10.0, ids[torch.from_numpy(clips)])
        loss = loss_m * 10 + loss_p * 10 + loss_i
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % 250 == 0:
            log(f"[evaluator] step {i + 1}/{steps} mouth_mse {loss_m.item():.4f} pose_mse {loss_p.item():.4f} "
                f"identity_ce {loss_i.item():.3f}")
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model
