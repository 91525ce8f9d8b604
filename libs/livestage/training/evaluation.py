"""The evaluation harness: `livestage evaluate` writes `report.json` and plots.

It plays long conversations (held-out sentences the model never heard) to the sample character
and measures, from the decoded frames:

- lip sync: correlation between the mouth openness the evaluator reads and the loudness of the
  speak audio, frame by frame (and mouth openness while speaking vs silent);
- listening: nods (the head's pitch the evaluator reads, away from its resting pitch) and smiles
  while the user talks or just stopped, against idle silence, and no false lip motion while
  listening (mouth openness while only the user speaks). Pixel motion is reported too, but a
  generator's flicker dominates it, so the responsiveness ratio is the nod ratio;
- identity: evaluator-embedding distance of frames to the reference portrait, per minute;
- artefacts: black frames, flicker (frame-to-frame luminance jumps, chunk-boundary jumps
  against within-chunk changes), colour drift per minute;
- cost: model evaluations (NFE) and seconds per chunk.

Runs compared: the renderer's own rendering of the same scenario (ground truth, the ceiling);
the teacher (full steps, CFG, bidirectional within its window, chunk-wise continuation); the
distilled backbone alone; backbone + refiner; with sinks (3 sinks + 2 window chunks) and without
(a 5-chunk rolling window: the same memory and cost, no permanent anchors). The distilled runs go
through the production stage classes (`runtime.stages`), exactly what the services run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from livestage.models.bundle import AvatarModels, build_models, shipped_weights_dir
from livestage.models.config import get_preset
from livestage.models.dit import WanDiT
from livestage.models.sampler import FlowMatchSchedule
from livestage.models.weights import load_weights, weights_digest
from livestage.runtime.stages import ConditionEncoder, DecoderSession, GeneratorSession, RefinerSession
from livestage.training.corpus import load_or_synthesize
from livestage.training.dataset import REFERENCE_LAYOUT, SAMPLE_IDENTITY_SEED, RenderedDataset, frames_to_tensor
from livestage.training.evaluator import FaceEvaluator, train_evaluator
from livestage.training.distillation import TEACHER_STEPS
from livestage.training.loop import plot_lines
from livestage.training.recipe import TEACHER_FILE, Recipe
from livestage.training.renderer import Identity, audio_features
from livestage.training.scenarios import Scenario, audio_window, long_session
from livestage.training.teacher import TeacherSampler, clip_conditions, reference_views
from livestage.training.dataset import render_scenario


@dataclass
class EvaluationConfig:
    long_minutes: float = 10.0
    short_minutes: float = 1.0
    teacher_steps: int = TEACHER_STEPS
    guidance: float = 3.0
    seed: int = 0


BLACK_LUMA = 16.0
"""A frame whose mean 0..255 value is below this counts as black."""


class RunMetrics:
    """Accumulates per-frame readings of one run, chunk by chunk (a 10-minute run is not kept)."""

    def __init__(self, evaluator: FaceEvaluator, reference_embedding: np.ndarray, fps: int,
                 reference_colour: np.ndarray):
        self.evaluator = evaluator
        self.ref = reference_embedding
        self.fps = fps
        self.ref_colour = reference_colour
        self.mouth: list[np.ndarray] = []
        self.pose: list[np.ndarray] = []  # [T, 3] yaw, pitch, smile as read
        self.identity: list[float] = []  # one per sampled frame
        self.identity_t: list[float] = []
        self.luma: list[np.ndarray] = []
        self.colour: list[np.ndarray] = []
        self.diff: list[np.ndarray] = []  # mean abs diff to the previous frame
        self.boundary: list[bool] = []
        self.black = 0
        self.frames = 0
        self._last: np.ndarray | None = None
        self.seconds: list[float] = []
        self.keep: list[np.ndarray] = []
        self.keep_frames = 0

    def add(self, frames: np.ndarray, seconds: float | None = None) -> None:
        mouth, emb, pose = self.evaluator.read(frames)
        self.mouth.append(mouth)
        self.pose.append(pose)
        for i in range(0, len(frames), 6):
            self.identity.append(float(1.0 - emb[i] @ self.ref))
            self.identity_t.append((self.frames + i) / self.fps)
        f = frames.astype(np.float32)
        luma = f.mean(axis=(1, 2, 3))
        self.luma.append(luma)
        self.colour.append(f.mean(axis=(1, 2)))
        self.black += int((luma < BLACK_LUMA).sum())
        prev = f[:1] if self._last is None else self._last[None]
        chain = np.concatenate([prev, f])
        self.diff.append(np.abs(np.diff(chain, axis=0)).mean(axis=(1, 2, 3)))
        self.boundary.extend([self._last is not None] + [False] * (len(frames) - 1))
        self._last = f[-1]
        self.frames += len(frames)
        if seconds is not None:
            self.seconds.append(seconds)
        if self.keep_frames and sum(len(k) for k in self.keep) < self.keep_frames:
            self.keep.append(frames)

    def truncated(self, minutes: float) -> "RunMetrics":
        """The readings of the first `minutes` only (every per-frame list cut at the same frame)."""
        n = int(minutes * 60 * self.fps)
        cut = RunMetrics(self.evaluator, self.ref, self.fps, self.ref_colour)
        for name in ("mouth", "pose", "luma", "colour", "diff"):
            setattr(cut, name, [np.concatenate(getattr(self, name))[:n]])
        t = np.array(self.identity_t)
        cut.identity = list(np.array(self.identity)[t < minutes * 60])
        cut.identity_t = list(t[t < minutes * 60])
        cut.boundary = self.boundary[:n]
        cut.frames = min(n, self.frames)
        cut.black = int((cut.luma[0] < BLACK_LUMA).sum())
        cut.seconds = self.seconds[: int(minutes * 60)]
        return cut

    def summary(self, scenario: Scenario, minutes: float) -> dict:
        n = self.frames
        mouth = np.concatenate(self.mouth)[:n]
        rate = scenario.sample_rate
        speak_loud, _ = audio_features(scenario.speak[scenario.preroll_s * rate:], rate, self.fps)
        listen_loud, _ = audio_features(scenario.listen[scenario.preroll_s * rate:], rate, self.fps)
        speak_loud, listen_loud = _fit(speak_loud, n), _fit(listen_loud, n)
        speaking = speak_loud > 0.05
        user = (listen_loud > 0.05) & ~speaking
        recent_user = _recent(listen_loud > 0.05, int(2 * self.fps)) & ~_recent(speaking, int(1 * self.fps))
        idle = ~_recent((listen_loud > 0.05) | speaking, int(3 * self.fps))
        diff = np.concatenate(self.diff)[:n]
        pose = np.concatenate(self.pose)[:n]
        nod = np.abs(pose[:, 1] - np.median(pose[:, 1]))  # degrees away from the resting pitch
        smile = pose[:, 2]
        listening = _recent(listen_loud > 0.05, int(self.fps)) & ~speaking
        boundary = np.array(self.boundary[:n])
        per_minute = []
        t = np.array(self.identity_t)
        ident = np.array(self.identity)
        colour = np.concatenate(self.colour)[:n]
        for m in range(int(np.ceil(minutes))):
            sel = (t >= 60 * m) & (t < 60 * (m + 1))
            fsel = slice(int(60 * m * self.fps), int(60 * (m + 1) * self.fps))
            if sel.any():
                per_minute.append({"minute": m + 1, "identity_distance": round(float(ident[sel].mean()), 4),
                                   "colour_drift": round(float(np.abs(colour[fsel].mean(axis=0) - self.ref_colour).mean()), 3)})
        corr = _corr(mouth, speak_loud)
        best = max(((lag, _corr(mouth[lag:], speak_loud[:n - lag])) for lag in range(0, 4)), key=lambda x: x[1])
        within = diff[~boundary].mean() if (~boundary).any() else 0.0
        out = {
            "frames": int(n),
            "lip_sync": {"mouth_loudness_correlation": round(corr, 4),
                         "best_lag_frames": best[0], "best_lag_correlation": round(best[1], 4),
                         "mouth_open_speaking": round(float(mouth[speaking].mean()) if speaking.any() else 0.0, 4),
                         "mouth_open_silent": round(float(mouth[~speaking].mean()) if (~speaking).any() else 0.0, 4)},
            "listening": {"nod_degrees_listening": _mean(nod, recent_user), "nod_degrees_idle": _mean(nod, idle),
                          "smile_listening": _mean(smile, listening), "smile_idle": _mean(smile, idle),
                          "pixel_motion_listening": _mean(diff, recent_user), "pixel_motion_idle": _mean(diff, idle),
                          "mouth_open_while_user_speaks": _mean(mouth, user)},
            "identity": {"mean_distance": round(float(ident.mean()), 4), "per_minute": per_minute},
            "artefacts": {"black_frames": int(self.black),
                          "flicker_luma": round(float(np.abs(np.diff(np.concatenate(self.luma)[:n])).mean()), 4),
                          "chunk_boundary_jump_ratio": round(float(diff[boundary].mean() / max(within, 1e-6))
                                                             if boundary.any() else 1.0, 3)},
        }
        lm = out["listening"]
        lm["responsiveness_ratio"] = round(lm["nod_degrees_listening"] / max(lm["nod_degrees_idle"], 0.1), 3)
        lm["smile_gain"] = round(lm["smile_listening"] - lm["smile_idle"], 4)
        if self.seconds:
            out["seconds_per_chunk_median"] = round(float(np.median(self.seconds)), 4)
        return out


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


def _mean(values: np.ndarray, where: np.ndarray) -> float:
    return round(float(values[where].mean()) if where.any() else 0.0, 4)


def _recent(active: np.ndarray, frames: int) -> np.ndarray:
    """True where `active` was true within the last `frames` frames (inclusive)."""
    out = np.zeros_like(active)
    last = -10 ** 9
    for i, a in enumerate(active):
        if a:
            last = i
        out[i] = i - last <= frames
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if n < 3 or a.std() < 1e-8 or b.std() < 1e-8:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


FLOP_CHUNK = 6
"""The chunk whose DiT work is counted in FLOPs: sinks full and the window sliding for the
students (their steady-state cost), continuation for the teacher."""


def _is_flop_chunk(k: int, chunks: int) -> bool:
    return k == min(FLOP_CHUNK, chunks - 1)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class FlopCount:
    """Counts the floating-point operations (matrix products, convolutions, attention) of the
    block it wraps when `active`; torch's counter has no formula for the CPU attention kernel, so
    it gets the standard one. FLOPs compare teacher and students independently of how well this
    CPU runs either (seconds favour the big batched passes of the teacher)."""

    def __init__(self, active: bool):
        self.active = active
        self.flops = 0
        self._mode: FlopCounterMode | None = None

    def __enter__(self) -> "FlopCount":
        if self.active:
            self._mode = FlopCounterMode(display=False, custom_mapping={
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.flops = int(self._mode.get_total_flops())


def chunk_windows(scenario: Scenario, k: int, chunks: int = 1, history: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rate = scenario.sample_rate
    end = (scenario.preroll_s + k + chunks) * rate
    window = (history + chunks) * rate
    return audio_window(scenario.speak, end, window), audio_window(scenario.listen, end, window)


def character_references(data: RenderedDataset, identity: int) -> list[tuple[str, torch.Tensor]]:
    images = data.reference_images[identity]
    return [(kind, frames_to_tensor(images[j:j + 1])[:, 0]) for j, (kind, _) in enumerate(REFERENCE_LAYOUT)]


@torch.no_grad()
def run_distilled(models: AvatarModels, refs, scenario: Scenario, chunks: int, metrics: RunMetrics,
                  backbone_metrics: RunMetrics | None = None, backbone_chunks: int = 0, seed: int = 0) -> dict:
    """The production stages chunk by chunk; backbone-only frames decoded for `backbone_chunks`."""
    enc = ConditionEncoder(models)
    latents = enc.encode_references(refs)
    gen, ref = GeneratorSession(models, seed, latents), RefinerSession(models, seed, latents)
    dec, dec_b = DecoderSession(models), DecoderSession(models)
    times = {"encode": [], "generate": [], "refine": [], "decode": []}
    dit_flops = 0
    for k in range(chunks):
        t0 = time.perf_counter()
        speak, listen = chunk_windows(scenario, k)
        inputs = enc.encode_chunk(k, speak, listen)
        t1 = time.perf_counter()
        with FlopCount(_is_flop_chunk(k, chunks)) as count:
            coarse = gen.generate(inputs)
            t2 = time.perf_counter()
            clean = ref.refine(inputs, coarse)
        dit_flops = count.flops or dit_flops
        t3 = time.perf_counter()
        frames = dec.decode(clean, k)
        t4 = time.perf_counter()
        if not count.active:  # the counted chunk runs slower under the counter
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[name].append(dt)
        metrics.add(frames, seconds=t4 - t0)
        if backbone_metrics is not None and k < backbone_chunks:
            tb = time.perf_counter()
            fb = dec_b.decode(coarse, k)
            backbone_metrics.add(fb, seconds=(t2 - t0) + (time.perf_counter() - tb))
    return {"stage_seconds_median": {name: round(float(np.median(v)), 4) for name, v in times.items() if v},
            "dit_gflops_per_chunk": round(dit_flops / 1e9, 4)}


@torch.no_grad()
def run_teacher(teacher: WanDiT, models: AvatarModels, refs, scenario: Scenario, chunks: int,
                metrics: RunMetrics, steps: int, guidance: float) -> dict:
    """Chunk-wise continuation with the full-step teacher (first two chunks jointly)."""
    p = models.preset
    hw = (p.latent_height, p.latent_width)
    enc = ConditionEncoder(models)
    latents = enc.encode_references(refs)
    sampler = TeacherSampler(teacher, FlowMatchSchedule(p.sampler), steps, guidance)
    views = reference_views(teacher, latents, hw, 1)
    dec = DecoderSession(models)
    lpc = p.chunk.latent_frames_per_chunk
    text = models.text_encoder.encode([""])
    previous = None
    seconds = []
    dit_flops = 0
    k = 0
    while k < chunks:
        t0 = time.perf_counter()
        joint = k == 0
        first = 0 if joint else k - 1
        speak, listen = chunk_windows(scenario, first, 2)
        feats = models.audio_encoder.extract(torch.from_numpy(np.stack([speak, listen])))
        cond = clip_conditions(teacher, text, feats[0:1], feats[1:2], views, 2, hw)
        uncond = clip_conditions(teacher, text, feats[0:1] * 0, feats[1:2] * 0, views, 2, hw)
        n = (2 if joint else 1)
        noise = torch.randn(1, p.vae.z_dim, lpc * n, *hw, generator=torch.Generator().manual_seed(k))
        with FlopCount(_is_flop_chunk(k, chunks)) as count:
            x0 = sampler.sample(noise, cond, uncond, context=previous).clean
        dit_flops = count.flops or dit_flops
        gen_s = (time.perf_counter() - t0) / n
        for j in range(n):
            if k + j >= chunks:
                break
            t1 = time.perf_counter()
            chunk = x0[:, :, j * lpc:(j + 1) * lpc]
            frames = dec.decode(chunk, k + j)
            metrics.add(frames, seconds=gen_s + time.perf_counter() - t1)
            if not count.active:
                seconds.append(gen_s)
            previous = chunk
        k += n
    return {"generate": round(float(np.median(seconds)), 4), "nfe_per_chunk": sampler.nfe_per_window,
            "dit_gflops_per_chunk": round(dit_flops / 1e9, 4)}


def _no_sinks(models: AvatarModels) -> AvatarModels:
    """The same weights with a 5-chunk rolling window instead of 3 sinks + 2 window chunks."""
    c = models.preset.chunk
    chunk = dataclasses.replace(c, sink_chunks=0, window_chunks=c.sink_chunks + c.window_chunks)
    preset = dataclasses.replace(models.preset, chunk=chunk)
    for m in (models.backbone, models.refiner):
        m.chunk = chunk
    return dataclasses.replace(models, preset=preset)


def run_evaluation(preset_name: str, workdir: Path, out: Path, weights: Path | None,
                   config: EvaluationConfig = EvaluationConfig(), log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(preset_name)
    weights_label = str(weights) if weights else f"shipped {preset.name} weights"
    weights = weights or shipped_weights_dir(preset.name)
    if weights is None:
        raise FileNotFoundError(f"no trained weights for preset {preset.name}: run `livestage train` first")
    Recipe(preset, workdir, log=log).run("data")  # the rendered clips (cheap; reused if present)
    data = RenderedDataset(workdir / "rendered")
    models = build_models(preset, weights, allow_seeded=False)
    evaluator = train_evaluator(data, models.vae, workdir / "evaluator.pt", log=log)
    teacher = WanDiT(preset.dit, preset.chunk)
    load_weights(teacher, Path(weights) / TEACHER_FILE)
    teacher.eval()
    corpus = load_or_synthesize(workdir / "corpus.npz", preset.chunk.sample_rate).split(held_out=True)
    fps = preset.chunk.fps
    ident = data.identity_seeds.index(SAMPLE_IDENTITY_SEED)
    refs = character_references(data, ident)
    ref_img = data.reference_images[ident][:1]
    ref_emb = evaluator.read(ref_img).embedding
    ref_colour = ref_img.astype(np.float32).mean(axis=(0, 1, 2))
    rng = np.random.default_rng([config.seed, 101])
    long = long_session(corpus, config.long_minutes, rng)
    short_chunks = int(round(config.short_minutes * 60))
    long_chunks = int(round(config.long_minutes * 60))
    short = dataclasses.replace(long, chunks=short_chunks)

    def new_metrics(keep_s: float = 0.0) -> RunMetrics:
        m = RunMetrics(evaluator, ref_emb[0], fps, ref_colour)
        m.keep_frames = int(keep_s * fps)
        return m

    report: dict = {"preset": preset.name,
                    "weights": {"dir": weights_label, "sha256": weights_digest(Path(weights))},
                    "config": dataclasses.asdict(config),
                    "scenario": {"minutes": config.long_minutes, "turns": len(long.turns),
                                 "held_out_sentences": True}}
    runs: dict[str, dict] = {}

    log("[evaluate] ground truth: the renderer on the same scenario")
    gt = new_metrics(20)
    clip = render_scenario(Identity.sample(SAMPLE_IDENTITY_SEED), short, fps, (preset.height, preset.width), seed=1)
    for k in range(short_chunks):
        gt.add(clip.frames[k * fps:(k + 1) * fps])
    runs["ground_truth_1min"] = gt.summary(short, config.short_minutes)

    log(f"[evaluate] teacher, {config.short_minutes} min (full steps, chunk-wise continuation)")
    tm = new_metrics(20)
    tcost = run_teacher(teacher, models, refs, short, short_chunks, tm, config.teacher_steps, config.guidance)
    runs["teacher_1min"] = {**tm.summary(short, config.short_minutes), "nfe_per_chunk": tcost["nfe_per_chunk"],
                            "dit_seconds_per_chunk": tcost["generate"],
                            "dit_gflops_per_chunk": tcost["dit_gflops_per_chunk"]}

    log(f"[evaluate] distilled with sinks, {config.long_minutes} min (and backbone alone for the first minute)")
    dm, bm = new_metrics(20), new_metrics(20)
    dcost = run_distilled(models, refs, long, long_chunks, dm, bm, short_chunks, seed=config.seed)
    full = dm.summary(long, config.long_minutes)
    runs["backbone_1min"] = {**bm.summary(short, config.short_minutes), "nfe_per_chunk": 2}
    runs["distilled_sinks_1min"] = dm.truncated(config.short_minutes).summary(short, config.short_minutes)
    stage_seconds = dcost["stage_seconds_median"]
    runs["distilled_sinks_10min"] = {**full, "nfe_per_chunk": 4, "stage_seconds_median": stage_seconds,
                                     "dit_seconds_per_chunk": round(stage_seconds["generate"] + stage_seconds["refine"], 4),
                                     "dit_gflops_per_chunk": dcost["dit_gflops_per_chunk"]}

    log(f"[evaluate] distilled without sinks (5-chunk rolling window), {config.long_minutes} min")
    nm = new_metrics(0)
    run_distilled(_no_sinks(build_models(preset, weights, allow_seeded=False)), refs, long, long_chunks, nm,
                  seed=config.seed)
    runs["distilled_no_sinks_10min"] = {**nm.summary(long, config.long_minutes), "nfe_per_chunk": 4}
    report["runs"] = runs
    report["summary"] = summarise(runs)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(runs, dm, nm, tm, gt, long, out)
    before_after(preset.name, Path(weights), out)
    for stage_dir in sorted(workdir.iterdir()):
        if (stage_dir / "losses.png").is_file():  # the training curves next to the report
            shutil.copyfile(stage_dir / "losses.png", out / f"losses_{stage_dir.name}.png")
    log(f"[evaluate] report written to {out / 'report.json'}")
    return report


@torch.no_grad()
def before_after(preset_name: str, weights: Path, out: Path) -> Path:
    """The sample character (bundled references) listening to the bundled question, then speaking
    the bundled answer, with seeded weights (before training) and the trained ones: one row each,
    a frame every half second from the end of the question."""
    from PIL import Image

    from livestage.media.samples import SampleCharacter
    from livestage.runtime.pipeline import StreamingAvatar

    preset = get_preset(preset_name)
    sample = SampleCharacter.load()
    refs = sample.reference_images((preset.height, preset.width))
    pause = np.zeros(8000, np.float32)
    listen = np.concatenate([sample.question, np.zeros(pause.size + sample.answer.size, np.float32)])
    speak = np.concatenate([np.zeros(sample.question.size, np.float32), pause, sample.answer])
    chunks = int(np.ceil(listen.size / 16000))
    rows = []
    for models in (build_models(preset, None, seed=0, use_shipped=False),
                   build_models(preset, weights, allow_seeded=False)):
        avatar = StreamingAvatar(models, refs, seed=0)
        avatar.push_speak_audio(speak)
        avatar.push_listen_audio(listen)
        frames = np.concatenate([avatar.step().frames for _ in range(chunks)])
        start = int(sample.question.size / 16000 * preset.chunk.fps) - preset.chunk.fps
        picks = [frames[min(i, len(frames) - 1)] for i in range(start, start + 8 * preset.chunk.fps // 2, preset.chunk.fps // 2)]
        rows.append(np.concatenate(picks, axis=1))
    path = out / "before_after.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def summarise(runs: dict[str, dict]) -> dict:
    t, d = runs["teacher_1min"], runs["distilled_sinks_1min"]
    s10, n10 = runs["distilled_sinks_10min"], runs["distilled_no_sinks_10min"]
    last = lambda r: r["identity"]["per_minute"][-1]["identity_distance"]  # noqa: E731
    return {
        "lip_sync_correlation": {k: runs[k]["lip_sync"]["mouth_loudness_correlation"] for k in
                                 ("ground_truth_1min", "teacher_1min", "backbone_1min", "distilled_sinks_1min")},
        "identity_distance_1min": {k: runs[k]["identity"]["mean_distance"] for k in
                                   ("ground_truth_1min", "teacher_1min", "backbone_1min", "distilled_sinks_1min")},
        "identity_distance_last_minute_10min": {"sinks": last(s10), "no_sinks": last(n10)},
        "compute_ratio_teacher_over_distilled": {
            "nfe": round(t["nfe_per_chunk"] / s10["nfe_per_chunk"], 2),
            # a teacher evaluation sees a two-chunk window: twice the tokens of a student's pass
            "chunk_sized_passes": round(t["nfe_per_chunk"] * 2 / s10["nfe_per_chunk"], 2),
            "dit_flops": round(t["dit_gflops_per_chunk"] / max(s10["dit_gflops_per_chunk"], 1e-9), 2),
            "dit_seconds": round(t["dit_seconds_per_chunk"] / max(s10["dit_seconds_per_chunk"], 1e-6), 2)},
        "black_frames": {k: r["artefacts"]["black_frames"] for k, r in runs.items()},
        "listening_responsiveness_ratio": {k: runs[k]["listening"]["responsiveness_ratio"] for k in
                                           ("ground_truth_1min", "teacher_1min", "distilled_sinks_1min")},
        "listening_smile_gain": {k: runs[k]["listening"]["smile_gain"] for k in
                                 ("ground_truth_1min", "teacher_1min", "distilled_sinks_1min")},
        "distilled_vs_teacher": {
            "lip_sync_correlation_gap": round(t["lip_sync"]["mouth_loudness_correlation"]
                                              - d["lip_sync"]["mouth_loudness_correlation"], 4),
            "identity_distance_gap": round(d["identity"]["mean_distance"] - t["identity"]["mean_distance"], 4)},
    }


def plot_report(runs: dict, sinks: RunMetrics, no_sinks: RunMetrics, teacher: RunMetrics, gt: RunMetrics,
                scenario: Scenario, out: Path) -> None:
    minutes = lambda r: [(p["minute"], p["identity_distance"]) for p in r["identity"]["per_minute"]]  # noqa: E731
    plot_lines({"with sinks": minutes(runs["distilled_sinks_10min"]),
                "no sinks (rolling window)": minutes(runs["distilled_no_sinks_10min"])},
               out / "identity_drift.png", title="identity distance to the reference, per minute")
    fps = sinks.fps
    n = 20 * fps
    rate = scenario.sample_rate
    loud, _ = audio_features(scenario.speak[: 20 * rate], rate, fps)
    series = {"speech loudness": list(enumerate(_fit(loud, n).tolist())),
              "ground truth mouth": list(enumerate(np.concatenate(gt.mouth)[:n].tolist())),
              "teacher mouth": list(enumerate(np.concatenate(teacher.mouth)[:n].tolist())),
              "distilled mouth": list(enumerate(np.concatenate(sinks.mouth)[:n].tolist()))}
    plot_lines(series, out / "lip_sync.png", title="mouth openness read from frames vs speech loudness (first 20 s)",
               size=(900, 360))
    strip = []
    kept = [np.concatenate(m.keep) for m in (gt, teacher, sinks) if m.keep]
    length = min((len(k) for k in kept), default=0)
    for frames in kept:
        strip.append(np.concatenate([frames[i] for i in range(0, min(length, 20 * fps), 2 * fps)], axis=1))
    if strip:
        from PIL import Image

        Image.fromarray(np.concatenate(strip, axis=0)).save(out / "frames_gt_teacher_distilled.png")
