"""What every training stage shares: resumable checkpoints, a loss log and its plot.

A stage is a set of modules and optimisers plus a `step(i) -> {loss name: value}` function.
`run_stage` calls it until `steps` are done, writes `state.pt` (modules, optimisers, step, torch and data RNGs)
every `checkpoint_every` steps and at the end, appends each step's losses to `losses.jsonl`, and
draws `losses.png`. Running the same command again resumes from `state.pt`; a finished stage
returns immediately, so the whole recipe can be re-run after an interruption.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw


@dataclass
class Stage:
    name: str
    workdir: Path
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    steps: int
    checkpoint_every: int = 100
    lr_schedule: Callable[[int], float] | None = None
    """Multiplier of every optimiser's base learning rate at step i (None: constant)."""
    extra_state: dict = field(default_factory=dict)
    """Plain picklable state the stage wants carried across a resume (e.g. a data cursor)."""
    data_rng: np.random.Generator | None = None
    """The generator the step function draws its batches from: checkpointed with the torch RNG,
    so a resumed stage continues the draws instead of replaying the first ones."""

    @property
    def dir(self) -> Path:
        return self.workdir / self.name

    @property
    def done_marker(self) -> Path:
        return self.dir / "done.json"

    def is_done(self) -> bool:
        return self.done_marker.is_file()


def _save(stage: Stage, step: int) -> None:
    state = {"step": step, "modules": {k: m.state_dict() for k, m in stage.modules.items()},
             "optimizers": {k: o.state_dict() for k, o in stage.optimizers.items()},
             "rng": torch.get_rng_state(), "extra": stage.extra_state,
             "data_rng": stage.data_rng.bit_generator.state if stage.data_rng is not None else None}
    tmp = stage.dir / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(stage.dir / "state.pt")


def _restore(stage: Stage) -> int:
    path = stage.dir / "state.pt"
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False)
    for k, m in stage.modules.items():
        m.load_state_dict(state["modules"][k])
    for k, o in stage.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    torch.set_rng_state(state["rng"])
    if stage.data_rng is not None and state.get("data_rng") is not None:
        stage.data_rng.bit_generator.state = state["data_rng"]
    stage.extra_state.update(state.get("extra", {}))
    return int(state["step"])


def read_losses(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_stage(stage: Stage, step_fn: Callable[[int], dict[str, float]], log=print) -> dict:
    """Runs (or resumes, or skips when finished) one stage; returns its summary."""
    stage.dir.mkdir(parents=True, exist_ok=True)
    if stage.is_done():
        _restore(stage)
        return json.loads(stage.done_marker.read_text())
    start = _restore(stage)
    base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in stage.optimizers.items()}
    if start:
        log(f"[{stage.name}] resuming at step {start}/{stage.steps}")
        base_lrs = {k: [g.get("initial_lr", g["lr"]) for g in o.param_groups]
                    for k, o in stage.optimizers.items()}
    for o in stage.optimizers.values():
        for g in o.param_groups:
            g.setdefault("initial_lr", g["lr"])
    losses_path = stage.dir / "losses.jsonl"
    if losses_path.is_file():
        # Steps logged after the checkpoint we resume from are run again: their old lines go, so the
        # log (and the stage's summed seconds) holds every step once.
        kept = [row for row in read_losses(losses_path) if row["step"] < start]
        losses_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    began = time.perf_counter()
    window: list[dict[str, float]] = []
    for m in stage.modules.values():
        m.train()
    with losses_path.open("a") as out:
        for i in range(start, stage.steps):
            if stage.lr_schedule is not None:
                mult = stage.lr_schedule(i)
                for k, o in stage.optimizers.items():
                    for g, base in zip(o.param_groups, base_lrs[k]):
                        g["lr"] = base * mult
            t0 = time.perf_counter()
            with torch.enable_grad():  # a caller inside no_grad (a test, an eval loop) still trains
                values = step_fn(i)
            values = {k: float(v) for k, v in values.items()}
            out.write(json.dumps({"step": i, "s": round(time.perf_counter() - t0, 3), **values}) + "\n")
            window.append(values)
            if (i + 1) % stage.checkpoint_every == 0 or i + 1 == stage.steps:
                out.flush()
                _save(stage, i + 1)
                mean = {k: round(float(np.mean([w[k] for w in window if k in w])), 5) for k in window[-1]}
                log(f"[{stage.name}] step {i + 1}/{stage.steps} {mean} "
                    f"({time.perf_counter() - began:.0f} s this run)")
                window = []
    for m in stage.modules.values():
        m.eval()
    history = read_losses(losses_path)
    plot_losses(history, stage.dir / "losses.png", title=stage.name)
    summary = {"stage": stage.name, "steps": stage.steps,
               "seconds": round(sum(h["s"] for h in history), 1),
               "first": _mean_of(history[: max(1, len(history) // 10)]),
               "last": _mean_of(history[-max(1, len(history) // 10):])}
    stage.done_marker.write_text(json.dumps(summary, indent=1))
    return summary


def _mean_of(rows: list[dict]) -> dict[str, float]:
    keys = [k for k in rows[0] if k not in ("step", "s")] if rows else []
    return {k: round(float(np.mean([r[k] for r in rows if k in r])), 5) for k in keys}


def cosine_schedule(steps: int, warmup: int = 20, floor: float = 0.1) -> Callable[[int], float]:
    def mult(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        p = (i - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    return mult


_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def plot_lines(series: dict[str, list[tuple[float, float]]], path: Path, title: str = "",
               log_y: bool = False, size: tuple[int, int] = (640, 360)) -> None:
    """A minimal line chart (PIL, no plotting dependency): one line per series, with a legend."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 30, 40
    pts = [p for s in series.values() for p in s if math.isfinite(p[1]) and (p[1] > 0 or not log_y)]
    d.text((left, 8), title, fill="black")
    if not pts:
        img.save(path)
        return
    xs = [p[0] for p in pts]
    ys = [math.log10(p[1]) if log_y else p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6
    d.rectangle([left, top, w - right, h - bottom], outline="black")

    def to_px(x: float, y: float) -> tuple[float, float]:
        yv = math.log10(y) if log_y else y
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (yv - y0) / (y1 - y0) * (h - top - bottom))

    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        py = h - bottom - (h - top - bottom) * k / 4
        d.text((4, py - 6), label, fill="black")
    d.text((left, h - bottom + 8), f"{x0:g}", fill="black")
    d.text((w - right - 40, h - bottom + 8), f"{x1:g}", fill="black")
    for n, (name, s) in enumerate(series.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        line = [to_px(x, y) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        d.text((w - right - 150, top + 4 + 12 * n), name, fill=colour)
    img.save(path)


CONTEXT_KEYS = frozenset({"step", "s", "chunk", "depth", "sigma"})
"""Log columns that say where a step was (its index, seconds, rollout chunk, stream depth, noise
level), not how well it did: kept in the log and the summaries, left out of the loss plot, where
their scale would flatten the losses."""


def plot_losses(history: list[dict], path: Path, title: str = "", smooth: int = 20) -> None:
    """Smoothed (moving average) curve of every loss in a stage's log."""
    if not history:
        return
    keys = [k for k in history[0] if k not in CONTEXT_KEYS]
    series = {}
    for k in keys:
        vals = np.array([r.get(k, np.nan) for r in history], dtype=np.float64)
        steps = np.array([r["step"] for r in history])
        n = max(1, min(smooth, len(vals) // 5 or 1))
        kernel = np.ones(n) / n
        sm = np.convolve(np.nan_to_num(vals), kernel, mode="valid")
        series[k] = list(zip(steps[n - 1:].tolist(), sm.tolist()))
    positive = all(y > 0 for s in series.values() for _, y in s)
    plot_lines(series, path, title=title, log_y=positive)
