"""The training recipe on `tiny`: every stage runs, learns, checkpoints, resumes, and exports
weights that the model bundle loads strictly and the streaming pipeline runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.models.dit import WanDiT
from livestage.models.sampler import FlowMatchSchedule
from livestage.models.vae import CausalVideoVAE
from livestage.models.weights import read_metadata, seeded_init
from livestage.runtime.pipeline import StreamingAvatar
from livestage.training.conditions import ConditionBuilder, Window
from livestage.training.dataset import LatentDataset, RenderedDataset
from livestage.training.distillation import (
    TeacherScoring,
    _Students,
    history_chunks,
    make_fake_critic,
)
from livestage.training import loop
from livestage.training.loop import read_losses
from livestage.training.recipe import Recipe, RecipeConfig
from livestage.training.teacher import clip_conditions, clip_flow, reference_views, sigma_grid
from livestage.training.teacher_training import TeacherTrainingConfig, train_teacher
from livestage.training.vae_training import (
    VAETrainingConfig,
    init_for_training,
    reconstruction_loss,
    sample_segments,
    train_deep_stream,
    train_vae,
)

PRESET = get_preset("tiny")
HW = (PRESET.latent_height, PRESET.latent_width)


def test_every_stage_ran_and_the_export_loads_strictly_and_streams(tiny_recipe):
    recipe, summary = tiny_recipe
    for name in ("vae", "vae_stream", "vae_deep_stream", "teacher", "stage1_ode", "stage2_dmd_offpolicy", "stage3_dmd_onpolicy", "stage4_refiner"):
        stage_dir = recipe.workdir / name
        assert (stage_dir / "state.pt").is_file() and (stage_dir / "losses.png").is_file()
        assert len(read_losses(stage_dir / "losses.jsonl")) == json.loads((stage_dir / "done.json").read_text())["steps"]
    out = recipe.out
    meta = read_metadata(out / "vae.safetensors")
    mean, std = json.loads(meta["latent_mean"]), json.loads(meta["latent_std"])
    assert len(mean) == PRESET.vae.z_dim and all(s > 0 for s in std)
    models = build_models("tiny", out, allow_seeded=False)
    assert not models.seeded and all(str(s).startswith("file:") for s in models.sources.values())
    assert torch.allclose(models.vae.latent_std, torch.tensor(std))
    # the exported students are not the teacher any more: distillation changed them
    teacher = WanDiT(PRESET.dit, PRESET.chunk)
    from livestage.models.weights import load_weights

    load_weights(teacher, out / "teacher.safetensors")
    diff = sum((a - b).abs().sum().item() for a, b in zip(teacher.parameters(), models.refiner.parameters()))
    assert diff > 0
    avatar = StreamingAvatar(models, [("global", torch.zeros(3, PRESET.height, PRESET.width))])
    avatar.push_speak_audio(np.zeros(PRESET.chunk.samples_per_chunk * 2, np.float32))
    frames = [avatar.step().frames for _ in range(2)]
    assert all(f.shape == (PRESET.chunk.frames_per_chunk, PRESET.height, PRESET.width, 3) for f in frames)
    record = json.loads((out / "recipe.json").read_text())
    assert set(record["stages"]) == {"vae", "teacher", "stage1", "stage2", "stage3", "stage4"}


def test_a_finished_recipe_is_skipped_and_a_stage_resumes_from_its_checkpoint(tiny_recipe):
    recipe, _ = tiny_recipe
    stage_dir = recipe.workdir / "stage4_refiner"
    rows_before = len(read_losses(stage_dir / "losses.jsonl"))
    again = Recipe("tiny", recipe.workdir, out=recipe.out, log=lambda line: None).run()
    assert len(read_losses(stage_dir / "losses.jsonl")) == rows_before  # nothing re-trained
    assert again["stages"]["stage4"]["steps"] == rows_before
    # an interrupted stage: more steps asked for than were checkpointed -> continues, not restarts
    cfg = RecipeConfig.for_preset("tiny")
    cfg.distill.stage4_steps = rows_before + 3
    (stage_dir / "done.json").unlink()
    Recipe("tiny", recipe.workdir, cfg, out=recipe.workdir / "export2", log=lambda line: None).run()
    steps = [r["step"] for r in read_losses(stage_dir / "losses.jsonl")]
    assert steps == list(range(rows_before + 3))


def _untrained_vae(tiny_recipe) -> tuple[RenderedDataset, CausalVideoVAE]:
    """The tiny recipe's rendered clips and a seeded VAE in its training initialisation."""
    recipe, _ = tiny_recipe
    vae = CausalVideoVAE(PRESET.vae)
    seeded_init(vae, 5)
    init_for_training(vae)
    return RenderedDataset(recipe.workdir / "rendered"), vae


def test_vae_training_lowers_its_reconstruction_loss(tiny_recipe, tmp_path):
    data, vae = _untrained_vae(tiny_recipe)
    fixed = sample_segments(data, np.random.default_rng(3), 4, 5, 16, PRESET.height, PRESET.width)

    def loss() -> float:
        with torch.no_grad():
            return reconstruction_loss(vae.decode(vae.encode(fixed)), fixed, 2.0, 0.2)[0].item()

    before = loss()
    train_vae(vae, data, tmp_path, VAETrainingConfig(steps=40, batch=4, crop=16, lr=2e-3, checkpoint_every=40,
                                                     stream_steps=0, deep_steps=0))
    assert loss() < 0.8 * before


def test_the_deep_stream_phase_lowers_the_loss_of_latents_deep_into_a_stream(tiny_recipe, tmp_path):
    data, vae = _untrained_vae(tiny_recipe)
    warm, trained = 4, 2
    fixed = sample_segments(data, np.random.default_rng(4), 4, 1 + 4 * (warm + trained - 1), 16,
                            PRESET.height, PRESET.width)
    deep = 1 + 4 * (warm - 1)  # the first frame of the latents after the deepest warm-up

    def loss() -> float:  # one plain encode + decode of the whole segment, scored on its deep frames
        with torch.no_grad():
            rec = vae.decode(vae.encode(fixed))[:, :, deep:]
            return reconstruction_loss(rec, fixed[:, :, deep:], 2.0, 0.2)[0].item()

    before = loss()
    summary = train_deep_stream(vae, data, tmp_path, VAETrainingConfig(
        crop=16, deep_steps=40, deep_batch=4, deep_max_warm_latents=warm, deep_latents=trained,
        deep_lr=2e-3, checkpoint_every=40), log=lambda line: None)
    assert summary["stage"] == "vae_deep_stream"
    depths = [r["depth"] for r in read_losses(tmp_path / "vae_deep_stream" / "losses.jsonl")]
    assert min(depths) == 0 and max(depths) == warm  # stream starts and deep warm-ups both trained
    assert loss() < 0.8 * before


def _builder(recipe) -> ConditionBuilder:
    from livestage.models.audio import LogMelAudioEncoder
    from livestage.models.text import HashedTextEncoder

    data = LatentDataset.load(recipe.workdir / "latents.pt")
    audio = LogMelAudioEncoder.for_preset(PRESET)
    text = HashedTextEncoder(PRESET.text_vocab_size, PRESET.dit.text_dim, PRESET.text_max_tokens)
    seeded_init(audio, 1)
    seeded_init(text, 2)
    return ConditionBuilder(data, PRESET, audio, text)


def test_teacher_training_lowers_the_flow_matching_loss(tiny_recipe, tmp_path):
    recipe, _ = tiny_recipe
    builder = _builder(recipe)
    teacher = WanDiT(PRESET.dit, PRESET.chunk)
    seeded_init(teacher, 3)
    windows = [Window(0, 0, 2), Window(1, 3, 2)]
    x0 = builder.latents(windows)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.tensor([0.3, 0.7])[:, None].expand(2, x0.shape[2])

    def loss() -> float:
        with torch.no_grad():
            speak, listen = builder.audio_features(windows)
            refs = builder.references(windows, [0])
            cond = clip_conditions(teacher, builder.text(["", ""]), speak, listen,
                                   reference_views(teacher, refs, HW, 2), 2, HW)
            s = sigma[:, None, :, None, None]
            flow = clip_flow(teacher, (1 - s) * x0 + s * noise, sigma, cond)
            return (flow - (noise - x0)).pow(2).mean().item()

    before = loss()
    train_teacher(teacher, builder, tmp_path, TeacherTrainingConfig(steps=60, batch=4, lr=2e-3, checkpoint_every=60),
                  HW, log=lambda line: None)
    assert loss() < 0.9 * before


def test_the_teacher_sigma_grid_passes_through_the_students_timesteps():
    schedule = FlowMatchSchedule(PRESET.sampler)
    grid = sigma_grid(schedule, 16)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))
    for t in (*PRESET.sampler.backbone_timesteps, PRESET.sampler.refiner_timestep):
        assert min(abs(g - schedule.sigma(t)) for g in grid) < 1e-9


def test_stage1_regression_onto_teacher_trajectories_lowers_its_loss(tiny_recipe, tmp_path):
    import copy

    from livestage.models.weights import load_weights
    from livestage.training.distillation import ALL_REFERENCES, DistillationConfig, TeacherSequences, train_ode_init
    from livestage.training.distillation import NoisyHistoryCache

    recipe, _ = tiny_recipe
    builder = _builder(recipe)
    load_weights(builder.audio_encoder, recipe.out / "audio_encoder.safetensors")
    load_weights(builder.text_encoder, recipe.out / "text_encoder.safetensors")
    teacher = WanDiT(PRESET.dit, PRESET.chunk)
    load_weights(teacher, recipe.out / "teacher.safetensors")
    seqs = TeacherSequences.load(recipe.workdir / "teacher_sequences.pt")
    students = _Students(PRESET, builder, HW)
    # a student that does not start at the teacher (whose tiny head is still near its zero init,
    # so a copy would already sit on the trajectories): the regression must pull it there
    backbone = copy.deepcopy(teacher)
    seeded_init(backbone, 5)
    idx, k = [0, 1], 6  # chunk 6: sinks full and the window sliding

    def loss() -> float:
        with torch.no_grad():
            clips = [seqs.clips[i] for i in idx]
            refs = builder.references([Window(c, 0, 1) for c in clips], ALL_REFERENCES)
            cache = students.new_cache(backbone, NoisyHistoryCache, refs)
            students.replay_history(backbone, cache, clips, k, lambda j: seqs.batch(idx, "at_t1", j), students.t1)
            cond = students.conditions.for_model(backbone, clips, k).student
            pred, _ = students.x0(backbone, seqs.batch(idx, "noise", k), students.t0, cond, cache)
            return torch.nn.functional.mse_loss(pred, seqs.batch(idx, "clean", k)).item()

    before = loss()
    train_ode_init(backbone, seqs, students, tmp_path, DistillationConfig(batch=2, stage1_steps=40, lr=1e-3,
                                                                        checkpoint_every=40), log=lambda line: None)
    assert loss() < 0.8 * before


def test_history_replay_matches_what_the_streaming_cache_holds():
    # 3 sinks + 2 window chunks: when chunk 7 is generated the cache holds 0, 1, 2, 5, 6
    assert history_chunks(7, 3, 2) == [0, 1, 2, 5, 6]
    assert history_chunks(2, 3, 2) == [0, 1]
    assert history_chunks(0, 3, 2) == []
    assert history_chunks(4, 0, 5) == [0, 1, 2, 3]


def _seeded_scoring(tiny_recipe) -> tuple:
    """A seeded teacher scoring the tiny recipe's data, its fake critic an exact copy, no CFG."""
    recipe, _ = tiny_recipe
    builder = _builder(recipe)
    teacher = WanDiT(PRESET.dit, PRESET.chunk)
    seeded_init(teacher, 4)
    scoring = TeacherScoring(teacher, make_fake_critic(teacher), builder, FlowMatchSchedule(PRESET.sampler),
                             guidance=1.0, latent_hw=HW, sigma_shift=3.0)
    return builder, scoring


def test_dmd_gradient_is_zero_when_the_fake_score_equals_the_teacher_and_points_to_the_teacher(tiny_recipe):
    builder, scoring = _seeded_scoring(tiny_recipe)
    clips, k = [0, 1], 2
    refs = builder.references([Window(c, 0, 1) for c in clips], [0])
    previous = builder.latents([Window(c, k - 1, 1) for c in clips])
    x0 = builder.latents([Window(c, k, 1) for c in clips]).requires_grad_(True)
    loss, parts = scoring.dmd_loss(x0, clips, k, refs, previous, None, np.random.default_rng(0))
    assert loss.item() == 0.0 and parts["gap_to_teacher"] > 0
    # a fake score that differs: the update moves x0 along (teacher x0 - fake x0)
    with torch.no_grad():
        for p in scoring.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _ = scoring.dmd_loss(x0, clips, k, refs, previous, None, np.random.default_rng(0))
    loss.backward()
    assert loss.item() > 0 and x0.grad is not None and x0.grad.abs().sum() > 0


def test_the_fake_critic_learns_the_generators_outputs(tiny_recipe):
    builder, scoring = _seeded_scoring(tiny_recipe)
    clips, k = [0, 1], 1
    refs = builder.references([Window(c, 0, 1) for c in clips], [0])
    previous = builder.latents([Window(c, 0, 1) for c in clips])
    generated = builder.latents([Window(c, 1, 1) for c in clips])
    opt = torch.optim.Adam(scoring.fake.parameters(), 2e-3)

    def loss(seed: int) -> float:
        return scoring.critic_loss(generated, clips, k, refs, previous, None, np.random.default_rng(seed))

    with torch.no_grad():
        before = np.mean([loss(s).item() for s in range(4)])
    for i in range(40):
        opt.zero_grad()
        loss(100 + i).backward()
        opt.step()
    with torch.no_grad():
        after = np.mean([loss(s).item() for s in range(4)])
    assert after < 0.9 * before


def test_the_rollout_stages_train_through_the_streaming_caches(tiny_recipe):
    recipe, _ = tiny_recipe
    rows = read_losses(recipe.workdir / "stage3_dmd_onpolicy" / "losses.jsonl")
    # sessions advance one chunk per step: chunk indices run 0..7 then start over, so the cache
    # filled its sinks and slid its window
    chunks = [int(r["chunk"]) for r in rows]
    assert chunks[:8] == list(range(8)) and max(chunks) == 7
    assert all(np.isfinite(r["dmd"]) and np.isfinite(r["critic"]) for r in rows)
    refiner_rows = read_losses(recipe.workdir / "stage4_refiner" / "losses.jsonl")
    assert all(r["coarse_to_refined"] > 0 for r in refiner_rows)


def test_the_loss_plot_leaves_out_where_a_step_was(monkeypatch, tmp_path):
    plotted = {}
    monkeypatch.setattr(loop, "plot_lines", lambda series, path, **kw: plotted.update(series))
    history = [{"step": i, "s": 0.1 * i, "loss": 1.0 / (i + 1), "depth": float(i % 20), "chunk": i % 8}
               for i in range(40)]
    loop.plot_losses(history, tmp_path / "losses.png")
    assert set(plotted) == {"loss"}


def _distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return sum((p - q).pow(2).sum().item() for p, q in zip(a.state_dict().values(), b.state_dict().values())) ** 0.5


def test_a_warm_start_keeps_the_vae_and_fine_tunes_the_teacher_from_the_given_weights(tiny_recipe, tmp_path):
    from livestage.models.weights import load_weights

    recipe, _ = tiny_recipe
    source = recipe.out
    workdir = tmp_path / "warm"
    workdir.mkdir()
    (workdir / "corpus.npz").write_bytes((recipe.workdir / "corpus.npz").read_bytes())
    cfg = RecipeConfig.for_preset("tiny")
    cfg.warm_start = str(source)
    summary = Recipe("tiny", workdir, cfg, out=tmp_path / "out", log=lambda line: None).run("teacher")
    assert summary["stages"]["vae"]["warm_start"] == str(source)
    assert "steps" not in summary["stages"]["vae"]
    assert not (workdir / "vae").exists()  # no VAE training at all
    assert summary["stages"]["teacher"]["steps"] == cfg.warm_teacher.steps
    # the latents were encoded by the warm-start VAE: the same clip encodes to the same latents
    assert torch.equal(LatentDataset.load(workdir / "latents.pt").latents,
                       LatentDataset.load(recipe.workdir / "latents.pt").latents)
    # the fine-tuned teacher moved, but stayed near the weights it started from
    state = torch.load(workdir / "teacher" / "state.pt", weights_only=False)["modules"]["teacher"]
    tuned, started, scratch = (WanDiT(PRESET.dit, PRESET.chunk) for _ in range(3))
    tuned.load_state_dict(state)
    load_weights(started, source / "teacher.safetensors")
    seeded_init(scratch, 0)
    assert 0 < _distance(tuned, started) < 0.5 * _distance(tuned, scratch)
    # the starting weights were kept apart from what a later export writes over
    assert (workdir / "warm_start" / "teacher.safetensors").read_bytes() == (source / "teacher.safetensors").read_bytes()
    # resuming needs the same start: other weights, or none, would mix two runs in one work directory
    for other in (str(tmp_path / "elsewhere"), None):
        cfg.warm_start = other
        with pytest.raises(ValueError, match="warm-started from .*resume it the same way"):
            Recipe("tiny", workdir, cfg, out=tmp_path / "out", log=lambda line: None).run("teacher")
    # and a work directory trained from scratch is not silently switched to a warm start
    cfg.warm_start = str(source)
    with pytest.raises(ValueError, match="trained from scratch"):
        Recipe("tiny", recipe.workdir, cfg, out=tmp_path / "out2", log=lambda line: None).run("teacher")


def test_a_warm_start_without_the_teacher_file_names_what_is_missing(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "vae.safetensors").write_bytes(b"")
    cfg = RecipeConfig.for_preset("tiny")
    cfg.warm_start = str(tmp_path / "w")
    recipe = Recipe("tiny", tmp_path / "work", cfg, log=lambda line: None)
    recipe.workdir.mkdir()
    with pytest.raises(FileNotFoundError, match="audio_encoder.*teacher.safetensors"):
        recipe._warm_start_weights()


def test_a_warm_start_vae_without_latent_statistics_is_refused_by_name(tiny_recipe, tmp_path):
    import shutil

    from livestage.models.weights import load_weights, save_weights

    recipe, _ = tiny_recipe
    source = tmp_path / "weights"
    shutil.copytree(recipe.out, source)
    vae = CausalVideoVAE(PRESET.vae)
    load_weights(vae, source / "vae.safetensors")
    save_weights(vae, source / "vae.safetensors")  # the same tensors, no metadata
    workdir = tmp_path / "warm"
    workdir.mkdir()
    (workdir / "corpus.npz").write_bytes((recipe.workdir / "corpus.npz").read_bytes())
    cfg = RecipeConfig.for_preset("tiny")
    cfg.warm_start = str(source)
    with pytest.raises(ValueError, match="vae.safetensors has no latent_mean/latent_std"):
        Recipe("tiny", workdir, cfg, out=tmp_path / "out", log=lambda line: None).run("teacher")


def test_nods_and_smiles_are_found_per_latent_frame():
    from livestage.training.dataset import behaviour_per_latent

    motion = np.zeros((24, 3), np.float32)
    motion[5, 1] = -16.0   # a full nod (either direction) in latent 1's frames
    motion[9, 2] = 0.3     # a faint smile in latent 2's frames
    motion[13, 1] = 40.0   # a look far up is clipped to full strength
    motion[:, 0] = 25.0    # yaw (looking aside) is not a nod or a smile
    got = behaviour_per_latent(motion, 4)
    assert got.shape == (6,)
    assert np.allclose(got, [0.0, 1.0, 0.3, 1.0, 0.0, 0.0])
