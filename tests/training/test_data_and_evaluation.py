"""Training data (corpus, scenarios, dataset alignment), the face evaluator, the report's metrics,
and the bundled sample character / shipped weights they depend on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from livestage.media.samples import SampleCharacter, sample_speech
from livestage.models.bundle import WEIGHT_FILES, build_models, shipped_weights_dir
from livestage.models.config import get_preset
from livestage.models.weights import weights_digest
from livestage.training.corpus import HELD_OUT, USER_SPEEDUP, corpus_clip, synthesize_corpus
from livestage.training.dataset import RenderedDataset, render_dataset, sample_character_images
from livestage.training.evaluation import EvaluationConfig, FlopCount, RunMetrics, run_evaluation
from livestage.training.evaluator import train_evaluator
from livestage.training.renderer import Identity
from livestage.training.scenarios import TRAIN_DIRECTIVES, Scenario, audio_window, conversation

from .helpers import synthetic_corpus

DEMO = get_preset("demo")


def test_piper_corpus_is_real_speech_trimmed_and_the_user_voice_is_faster():
    corpus = synthesize_corpus(16000, character_lines=("Hello there, my friend.",), user_lines=("Hello there, my friend.",))
    char, user = corpus.character[0], corpus.user[0]
    assert 0.6 < char.size / 16000 < 3.0 and np.abs(char).max() == pytest.approx(0.6, abs=1e-3)
    assert abs(char[:50]).max() < 0.05 and abs(char[-50:]).max() < 0.05  # silence trimmed to a margin
    # Piper's durations vary from one synthesis to the next, so the speed-up is checked on one
    # synthesis: the user's copy of the same audio is 1/1.18 as long, give or take the trim margins
    from livestage.speech.tts import PiperSynthesizer

    tts = PiperSynthesizer()
    raw = tts.synthesize("Hello there, my friend.")
    same, faster = (corpus_clip(raw, tts.sample_rate, 16000, s) for s in (1.0, USER_SPEEDUP))
    assert faster.size / same.size == pytest.approx(1 / USER_SPEEDUP, abs=0.02)


def test_corpus_split_keeps_held_out_sentences_apart():
    c = synthetic_corpus(12)
    train, held = c.split(False), c.split(True)
    assert len(held.character) == HELD_OUT and not set(train.character_text) & set(held.character_text)


def test_conversations_are_deterministic_take_turns_and_directives_hold_for_chunks():
    corpus = synthetic_corpus(12)
    a = conversation(corpus, 8, np.random.default_rng(4))
    b = conversation(corpus, 8, np.random.default_rng(4))
    assert np.array_equal(a.speak, b.speak) and a.directives == b.directives
    assert a.speak.size == a.listen.size == (8 + a.preroll_s) * 16000
    whos = [w for w, _, _ in a.turns]
    assert {"user", "character"} <= set(whos) or len(whos) < 3
    many = [conversation(corpus, 8, np.random.default_rng(s)).directives for s in range(30)]
    spans = [d for d in many if any(d)]
    assert spans and all(len({t for t in d if t}) == 1 and sum(1 for t in d if t) >= 2 for d in spans)
    assert {t for d in spans for t in d if t} <= set(TRAIN_DIRECTIVES)


def test_audio_window_is_the_3s_ending_at_the_chunk_end_zero_padded():
    track = np.arange(5 * 16000, dtype=np.float32)
    w = audio_window(track, 16000, 48000)
    assert w.shape == (48000,) and (w[:32000] == 0).all() and w[-1] == 15999
    assert audio_window(track, 4 * 16000, 48000)[0] == 16000


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("rendered")
    render_dataset(root, DEMO, synthetic_corpus(12), identities=3, clips_per_identity=1, chunks=3,
                   sample_identity_weight=2, log=lambda line: None)
    return RenderedDataset(root)


def test_rendered_dataset_is_aligned_with_its_audio_and_ground_truth(rendered):
    assert len(rendered) == 4  # the sample identity counts twice
    assert rendered.frames.shape == (4 * 72, 128, 128, 3)
    assert rendered.mouth_open.shape == (4, 72)
    for i in range(len(rendered)):
        rate, pre = rendered.sample_rate, rendered.clips[i]["preroll_s"]
        audio, hop = rendered.speak[i][pre * rate:], rate / 24
        loud = np.array([np.abs(audio[int(t * hop):int((t + 1) * hop)]).max() for t in range(72)])
        # where the character's audio is silent for a whole frame, the mouth is closed (after a
        # few frames of smoothing)
        quiet = loud < 1e-4
        silent = np.array([quiet[max(0, t - 6):t + 1].all() and t >= 6 for t in range(72)])
        assert (rendered.mouth_open[i][silent] < 0.05).all()
    assert rendered.identity_seeds[0] == 1000 and len(rendered.reference_images) == 3


def test_rendered_clips_made_with_other_settings_are_refused_not_reused(rendered):
    # the same settings find the cached clips
    assert render_dataset(rendered.root, DEMO, synthetic_corpus(12), identities=3, clips_per_identity=1, chunks=3,
                          sample_identity_weight=2, log=lambda line: None) == rendered.root
    with pytest.raises(ValueError, match="other settings.*remove the work directory"):
        render_dataset(rendered.root, DEMO, synthetic_corpus(12), identities=3, clips_per_identity=2, chunks=3,
                       sample_identity_weight=2, log=lambda line: None)


@pytest.fixture(scope="module")
def evaluator(rendered, tmp_path_factory):
    return train_evaluator(rendered, None, tmp_path_factory.mktemp("ev") / "evaluator.pt", steps=300, batch=16,
                           log=lambda line: None)


def test_the_evaluator_reads_mouth_openness_and_tells_identities_apart(rendered, evaluator):
    from livestage.training.dataset import render_scenario
    from livestage.training.scenarios import conversation

    # a new clip it never saw
    scenario = conversation(synthetic_corpus(12), 3, np.random.default_rng(99))
    clip = render_scenario(Identity.sample(1000), scenario, 24, (128, 128), seed=5)
    mouth, emb, pose = evaluator.read(clip.frames)
    if clip.mouth_open.std() > 0.05:
        assert np.corrcoef(mouth, clip.mouth_open)[0, 1] > 0.6
    # the head pose it reads follows the rendered yaw and pitch (the nods listening produces)
    for axis in (0, 1):
        if clip.motion[:, axis].std() > 1.0:
            assert np.corrcoef(pose[:, axis], clip.motion[:, axis])[0, 1] > 0.5, axis
    refs = evaluator.read(np.stack([imgs[0] for imgs in rendered.reference_images])).embedding
    same = float(emb.mean(axis=0) @ refs[0]) / np.linalg.norm(emb.mean(axis=0))
    other = max(float(emb.mean(axis=0) @ r) / np.linalg.norm(emb.mean(axis=0)) for r in refs[1:])
    assert same > other


@pytest.fixture(scope="module")
def listening_evaluator(tmp_path_factory):
    """An evaluator whose training clips contain nods (long user turns), so it learns to read pitch."""
    root = tmp_path_factory.mktemp("rendered_listening")
    render_dataset(root, DEMO, synthetic_corpus(12, user_seconds=2.5), identities=2, clips_per_identity=2,
                   chunks=6, sample_identity_weight=1, log=lambda line: None)
    data = RenderedDataset(root)
    assert np.abs(data.motion[:, :, 1]).max() > 5.0
    return train_evaluator(data, None, root / "evaluator.pt", steps=300, batch=16, log=lambda line: None)


def test_listening_is_read_as_nods_and_smiles_not_as_pixel_change(listening_evaluator):
    from livestage.training.dataset import render_scenario

    # the user talks for 2 s and pauses; the character is silent throughout: the renderer
    # smiles while the user talks and nods in the pause (smiles are too faint for an evaluator
    # trained on four clips to read reliably; the demo's evaluator reads them)
    rate, seconds = 16000, 6
    listen = np.zeros(seconds * rate, np.float32)
    listen[:2 * rate] = 2.0 * sample_speech(2.0, rate, seed=3)
    scenario = Scenario(np.zeros_like(listen), listen, [""] * seconds, seconds, 0, rate)
    clip = render_scenario(Identity.sample(1000), scenario, 24, (128, 128), seed=5)
    assert np.abs(clip.motion[:, 1]).max() > 5.0 and clip.motion[:, 2].max() > 0.2  # the renderer did both

    def run(frames, noise: float = 0.0) -> dict:
        m = RunMetrics(listening_evaluator, listening_evaluator.read(clip.frames[:1]).embedding[0], 24,
                       np.zeros(3, np.float32))
        rng = np.random.default_rng(0)
        for k in range(seconds):
            f = frames[k * 24:(k + 1) * 24].astype(np.float32)
            m.add(np.clip(f + rng.normal(0, noise, f.shape), 0, 255).astype(np.uint8))
        return m.summary(scenario, seconds / 60)["listening"]

    truth = run(clip.frames)
    still = clip.frames[:1].repeat(len(clip.frames), axis=0)
    flicker = run(still, noise=12.0)  # a frozen face under heavy frame-to-frame noise
    assert truth["nod_degrees_listening"] > 2 * flicker["nod_degrees_listening"]
    # pixel change calls the flickering frozen face the livelier listener; the pose reading does not
    assert flicker["pixel_motion_listening"] > 10 * truth["pixel_motion_listening"]
    assert truth["responsiveness_ratio"] > 2 * flicker["responsiveness_ratio"]


def test_run_metrics_score_ground_truth_above_a_frozen_face_and_count_black_frames(rendered, evaluator):
    scenario = conversation(synthetic_corpus(12), 6, np.random.default_rng(7), preroll_s=0)
    from livestage.training.dataset import render_scenario

    clip = render_scenario(Identity.sample(1000), scenario, 24, (128, 128), seed=5)
    ref = rendered.reference_images[0][:1]
    ref_emb = evaluator.read(ref).embedding
    colour = ref.astype(np.float32).mean(axis=(0, 1, 2))

    def run(frames) -> dict:
        m = RunMetrics(evaluator, ref_emb[0], 24, colour)
        for k in range(6):
            m.add(frames[k * 24:(k + 1) * 24], seconds=0.1)
        return m.summary(scenario, 0.1)

    truth = run(clip.frames)
    frozen = run(np.repeat(clip.frames[:1], len(clip.frames), axis=0))
    black = clip.frames.copy()
    black[30:40] = 0
    assert truth["lip_sync"]["mouth_loudness_correlation"] > frozen["lip_sync"]["mouth_loudness_correlation"] + 0.3
    assert frozen["artefacts"]["black_frames"] == 0 and run(black)["artefacts"]["black_frames"] == 10
    assert frozen["artefacts"]["flicker_luma"] == 0.0 and truth["artefacts"]["flicker_luma"] > 0
    assert truth["identity"]["mean_distance"] < 0.5
    assert truth["seconds_per_chunk_median"] == 0.1


def test_evaluation_report_on_the_tiny_recipe(tiny_recipe, tmp_path):
    recipe, _ = tiny_recipe
    import livestage.training.evaluation as evaluation

    original = evaluation.train_evaluator
    evaluation.train_evaluator = lambda *a, **k: original(*a, **{**k, "steps": 20})
    try:
        report = run_evaluation("tiny", recipe.workdir, tmp_path, recipe.out,
                                EvaluationConfig(long_minutes=0.4, short_minutes=0.2, teacher_steps=4),
                                log=lambda line: None)
    finally:
        evaluation.train_evaluator = original
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"] == report["summary"]
    # the report names the weights by content, not by this machine's path
    assert saved["weights"]["dir"] == str(recipe.out)
    assert set(saved["weights"]["sha256"]) == {*WEIGHT_FILES.values(), "teacher.safetensors"}
    assert saved["weights"]["sha256"] == weights_digest(recipe.out)
    runs = report["runs"]
    assert set(runs) == {"ground_truth_1min", "teacher_1min", "backbone_1min", "distilled_sinks_1min",
                         "distilled_sinks_10min", "distilled_no_sinks_10min"}
    fps = get_preset("tiny").chunk.fps
    assert runs["distilled_sinks_10min"]["frames"] == round(0.4 * 60) * fps
    assert runs["teacher_1min"]["nfe_per_chunk"] == 8 and runs["distilled_sinks_10min"]["nfe_per_chunk"] == 4
    assert report["summary"]["compute_ratio_teacher_over_distilled"]["nfe"] == 2.0
    # FLOPs counted on one chunk of each: the teacher's 4 guided steps over a two-chunk window cost
    # more than the students' few single-chunk passes, and both counts are real (non-zero)
    assert runs["distilled_sinks_10min"]["dit_gflops_per_chunk"] > 0
    assert report["summary"]["compute_ratio_teacher_over_distilled"]["dit_flops"] > 1.0
    for name in ("identity_drift.png", "lip_sync.png", "frames_gt_teacher_distilled.png", "before_after.png"):
        assert Image.open(tmp_path / name).size[0] > 100


def test_the_bundled_sample_character_is_the_renderer_identity_the_model_trained_on():
    sample = SampleCharacter.load()
    kinds = [k for k, _ in sample.references]
    assert kinds == ["global", "view", "view", "expression", "expression", "expression"]
    for (_, data), expected in zip(sample.references, sample_character_images()):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), expected)
    assert sample.answer.size > 16000 and sample.question.size > 16000


def test_the_demo_preset_loads_its_shipped_trained_weights_by_default():
    root = shipped_weights_dir("demo")
    if root is None:
        pytest.skip("no trained demo weights in this checkout")
    assert all((root / f).is_file() for f in WEIGHT_FILES.values())
    models = build_models("demo", allow_seeded=False)
    assert not models.seeded and all(Path(str(s)[5:]).parent == root for s in models.sources.values())
    assert models.vae.latent_std.min() > 0 and not np.allclose(models.vae.latent_std.numpy(), 1.0)
    assert shipped_weights_dir("tiny") is None


def test_flop_count_counts_matrix_products_and_the_cpu_attention_kernel():
    linear, x = torch.nn.Linear(32, 16, bias=False), torch.randn(10, 32)
    with torch.no_grad(), FlopCount(True) as count:
        linear(x)
    assert count.flops == 2 * 10 * 32 * 16
    q = torch.randn(1, 2, 8, 4)  # [B, heads, L, d]
    with torch.no_grad(), FlopCount(True) as count:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert count.flops == 2 * (2 * 2 * 8 * 8 * 4)  # scores and weighted sum, per head
    with torch.no_grad(), FlopCount(False) as count:
        linear(x)
    assert count.flops == 0
