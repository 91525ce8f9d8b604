"""The whole training recipe as one resumable command: `livestage train --preset demo`.

    data -> vae -> latents -> teacher -> teacher sequences -> stage 1 (ODE init)
         -> stage 2 (off-policy DMD) -> stage 3 (on-policy DMD) -> stage 4 (refiner DMD) -> export

Every step keeps its outputs under the work directory (checkpoints, `losses.jsonl`,
`losses.png`) and is skipped when already done, so an interrupted run continues where it
stopped; `--until STAGE` stops after a stage. `export` writes the weight files the `demo` preset
loads by default (`livestage/models/trained/<preset>/`), with the VAE's latent statistics in its
metadata and a `recipe.json` saying how they were made.

`RecipeConfig.for_preset("demo")` is sized for about two hours on two CPU cores;
`for_preset("tiny")` runs the whole recipe in a couple of minutes (the tests).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from livestage.models.audio import LogMelAudioEncoder
from livestage.models.bundle import TRAINED_ROOT, WEIGHT_FILES, read_latent_stats
from livestage.models.config import ModelPreset, get_preset
from livestage.models.dit import WanDiT
from livestage.models.sampler import FlowMatchSchedule
from livestage.models.text import HashedTextEncoder
from livestage.models.vae import CausalVideoVAE
from livestage.models.weights import load_weights, save_weights, seeded_init
from livestage.training.conditions import ConditionBuilder
from livestage.training.corpus import load_or_synthesize
from livestage.training.dataset import LatentDataset, RenderedDataset, encode_dataset, render_dataset
from livestage.training.distillation import (
    DistillationConfig,
    TeacherScoring,
    _Students,
    generate_teacher_sequences,
    make_fake_critic,
    train_offpolicy_dmd,
    train_ode_init,
    train_onpolicy_dmd,
    train_refiner_dmd,
)
from livestage.training.teacher_training import TeacherTrainingConfig, train_teacher
from livestage.training.teacher_training import init_for_training as init_teacher_for_training  # noqa: I001
from livestage.training.vae_training import (
    VAETrainingConfig,
    fit_latent_stats,
    init_for_training,
    reconstruction_psnr,
    train_vae,
)

STAGES = ("data", "vae", "latents", "teacher", "sequences", "stage1", "stage2", "stage3", "stage4", "export")

TEACHER_FILE = "teacher.safetensors"
"""The teacher ships next to the students: the evaluation harness compares against it."""


def trained_weights_dir(preset: str) -> Path:
    """Where the shipped weights of a preset live (inside the package)."""
    return TRAINED_ROOT / preset


@dataclass
class RecipeConfig:
    identities: int = 24
    clips_per_identity: int = 4
    clip_chunks: int = 8
    vae: VAETrainingConfig = field(default_factory=VAETrainingConfig)
    teacher: TeacherTrainingConfig = field(default_factory=lambda: TeacherTrainingConfig(steps=2400))
    distill: DistillationConfig = field(default_factory=lambda: DistillationConfig(sequences=32))
    threads: int = 0
    warm_start: str | None = None
    """A directory of earlier exported weights (VAE, teacher, encoders) to start from: the VAE is
    taken as it is and the teacher fine-tuned (`warm_teacher`) instead of trained from zero; the
    distillation stages run in full. For a change of data or teacher loss that does not need a
    new VAE (the renderer's bigger listening nods were one)."""
    warm_teacher: TeacherTrainingConfig = field(default_factory=lambda: TeacherTrainingConfig(steps=1500, lr=2e-4))

    @classmethod
    def for_preset(cls, name: str) -> "RecipeConfig":
        if name == "demo":
            return cls()
        if name == "tiny":
            return cls(identities=3, clips_per_identity=1, clip_chunks=8,
                       vae=VAETrainingConfig(steps=12, batch=2, crop=16, checkpoint_every=6, stream_steps=6,
                                             stream_batch=2, stream_latents_per_segment=2, deep_steps=6,
                                             deep_batch=2, deep_max_warm_latents=4, deep_latents=2),
                       teacher=TeacherTrainingConfig(steps=12, batch=2, checkpoint_every=6),
                       warm_teacher=TeacherTrainingConfig(steps=6, batch=2, checkpoint_every=3),
                       distill=DistillationConfig(batch=2, sequences=2, sequence_chunks=8, teacher_steps=4,
                                                  stage1_steps=8, stage2_steps=4, stage3_steps=10,
                                                  stage4_steps=10, checkpoint_every=4, rollout_chunks=8))
        raise ValueError(f"no training recipe for preset {name!r} (use demo or tiny)")


class Recipe:
    def __init__(self, preset: ModelPreset | str, workdir: Path, config: RecipeConfig | None = None,
                 out: Path | None = None, seed: int = 0, log=print):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.workdir = Path(workdir)
        self.config = config or RecipeConfig.for_preset(self.preset.name)
        self.out = Path(out) if out else trained_weights_dir(self.preset.name)
        self.seed = seed
        self.log = log
        self.latent_hw = (self.preset.latent_height, self.preset.latent_width)
        self.summaries: dict[str, dict] = {}

    # -- the models, rebuilt the same way for every stage (and restored from its checkpoint) ------
    def _dit(self, offset: int) -> WanDiT:
        model = WanDiT(self.preset.dit, self.preset.chunk)
        seeded_init(model, self.seed * 101 + offset)
        return model

    def run(self, until: str = "export") -> dict:
        if until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        stop = STAGES.index(until)
        cfg, p = self.config, self.preset

        corpus = load_or_synthesize(self.workdir / "corpus.npz", p.chunk.sample_rate).split(held_out=False)
        rendered = RenderedDataset(render_dataset(self.workdir / "rendered", p, corpus, cfg.identities,
                                                  cfg.clips_per_identity, cfg.clip_chunks, self.seed, log=self.log))
        if stop < 1:
            return self._finish(began)

        warm = self._warm_start_weights()
        vae = CausalVideoVAE(p.vae)
        if warm is not None:
            load_weights(vae, warm / WEIGHT_FILES["vae"])
            stats = read_latent_stats(warm / WEIGHT_FILES["vae"])
            if stats is None:
                raise ValueError(f"warm_start {cfg.warm_start}: {WEIGHT_FILES['vae']} has no latent_mean/latent_std "
                                 "metadata (weights exported by the recipe have it)")
            mean, std = (torch.tensor(v) for v in stats)
            self.summaries["vae"] = {"warm_start": cfg.warm_start}
        else:
            seeded_init(vae, self.seed * 101 + 2)
            init_for_training(vae)
            self.summaries["vae"] = train_vae(vae, rendered, self.workdir, cfg.vae, self.seed, log=self.log)
            stats_path = self.workdir / "vae" / "latent_stats.pt"
            if not stats_path.is_file():
                torch.save(fit_latent_stats(vae, rendered), stats_path)
            mean, std = torch.load(stats_path)
        vae.set_latent_stats(mean, std)
        vae.eval().requires_grad_(False)
        self.summaries["vae"]["psnr_db"] = round(reconstruction_psnr(vae, rendered.clip_frames(0)), 2)
        if stop < 2:
            return self._finish(began)

        latents_path = self.workdir / "latents.pt"
        if not latents_path.is_file():
            encode_dataset(rendered, vae, p.chunk.latent_frames_per_chunk, log=self.log).save(latents_path)
        data = LatentDataset.load(latents_path)
        if stop < 3:
            return self._finish(began)

        teacher = self._dit(0)
        audio_encoder = LogMelAudioEncoder.for_preset(p)
        seeded_init(audio_encoder, self.seed * 101 + 3)
        text_encoder = HashedTextEncoder(p.text_vocab_size, p.dit.text_dim, p.text_max_tokens)
        seeded_init(text_encoder, self.seed * 101 + 4)
        if warm is not None:
            load_weights(teacher, warm / TEACHER_FILE)
            load_weights(audio_encoder, warm / WEIGHT_FILES["audio_encoder"])
            load_weights(text_encoder, warm / WEIGHT_FILES["text_encoder"])
        else:
            init_teacher_for_training(teacher)
        builder = ConditionBuilder(data, p, audio_encoder, text_encoder)
        teacher_config = cfg.warm_teacher if warm is not None else cfg.teacher
        self.summaries["teacher"] = train_teacher(teacher, builder, self.workdir, teacher_config, self.latent_hw,
                                                  self.seed, log=self.log)
        for m in (teacher, audio_encoder, text_encoder):
            m.eval().requires_grad_(False)
        if stop < 4:
            return self._finish(began)

        seqs = generate_teacher_sequences(teacher, builder, cfg.distill, self.latent_hw,
                                          self.workdir / "teacher_sequences.pt", self.seed, log=self.log)
        if stop < 5:
            return self._finish(began)

        students = _Students(p, builder, self.latent_hw)
        backbone = copy.deepcopy(teacher).requires_grad_(True)
        self.summaries["stage1"] = train_ode_init(backbone, seqs, students, self.workdir, cfg.distill,
                                                  self.seed, log=self.log)
        if stop < 6:
            return self._finish(began)

        fake = make_fake_critic(teacher)
        scoring = TeacherScoring(teacher, fake, builder, FlowMatchSchedule(p.sampler), cfg.distill.guidance,
                                 self.latent_hw, cfg.distill.dmd_sigma_shift)
        self.summaries["stage2"] = train_offpolicy_dmd(backbone, scoring, vae, seqs, students, self.workdir,
                                                       cfg.distill, self.seed, log=self.log)
        if stop < 7:
            return self._finish(began)
        self.summaries["stage3"] = train_onpolicy_dmd(backbone, scoring, students, self.workdir, cfg.distill,
                                                      self.seed, log=self.log)
        backbone.eval().requires_grad_(False)
        if stop < 8:
            return self._finish(began)
        refiner = copy.deepcopy(backbone).requires_grad_(True)
        self.summaries["stage4"] = train_refiner_dmd(backbone, refiner, scoring, students, self.workdir,
                                                     cfg.distill, self.seed, log=self.log)
        refiner.eval().requires_grad_(False)
        if stop < 9:
            return self._finish(began)
        self.export(backbone, refiner, vae, audio_encoder, text_encoder, teacher)
        return self._finish(began)

    def _warm_start_weights(self) -> Path | None:
        """The warm-start weights, copied into the work directory on first use: a resumed run
        must not pick up what its own export has since written over them."""
        kept = self.workdir / "warm_start"
        first = json.loads((kept / "source.json").read_text())["source"] if kept.is_dir() else None
        wanted = str(Path(self.config.warm_start).resolve()) if self.config.warm_start else None
        if first is not None and first != wanted:
            raise ValueError(f"warm_start {self.config.warm_start}: this work directory was warm-started "
                             f"from {first}; resume it the same way or use a new work directory")
        if wanted is None:
            return None
        if first is None and (self.workdir / "vae").is_dir():
            raise ValueError(f"warm_start {wanted}: this work directory was trained from scratch; "
                             "resume it without --warm-start or use a new work directory")
        source = Path(wanted)
        if first is None:
            files = [WEIGHT_FILES["vae"], WEIGHT_FILES["audio_encoder"], WEIGHT_FILES["text_encoder"], TEACHER_FILE]
            missing = [f for f in files if not (source / f).is_file()]
            if missing:
                raise FileNotFoundError(f"warm_start {source} lacks {', '.join(missing)}")
            tmp = self.workdir / "warm_start.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in files:
                shutil.copy2(source / f, tmp / f)
            (tmp / "source.json").write_text(json.dumps({"source": wanted}))
            tmp.rename(kept)
        return kept

    def export(self, backbone: WanDiT, refiner: WanDiT, vae: CausalVideoVAE, audio_encoder: torch.nn.Module,
               text_encoder: torch.nn.Module, teacher: WanDiT) -> Path:
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        meta = {"preset": self.preset.name, "recipe": "livestage.training.recipe"}
        save_weights(backbone, out / WEIGHT_FILES["backbone"], meta)
        save_weights(refiner, out / WEIGHT_FILES["refiner"], meta)
        vae_meta = {**meta, "latent_mean": json.dumps(vae.latent_mean.tolist()),
                    "latent_std": json.dumps(vae.latent_std.tolist())}
        save_weights(vae, out / WEIGHT_FILES["vae"], vae_meta)
        save_weights(audio_encoder, out / WEIGHT_FILES["audio_encoder"], meta)
        save_weights(text_encoder, out / WEIGHT_FILES["text_encoder"], meta)
        save_weights(teacher, out / TEACHER_FILE, meta)
        record = {"preset": self.preset.name, "seed": self.seed, "config": asdict(self.config),
                  "stages": self.summaries}
        (out / "recipe.json").write_text(json.dumps(record, indent=1, default=str))
        self.log(f"[export] weights written to {out}")
        return out

    def _finish(self, began: float) -> dict:
        summary = {"event": "done", "workdir": str(self.workdir), "stages": self.summaries,
                   "seconds_this_run": round(time.perf_counter() - began, 1)}
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary
