"""The stage loop's checkpoints: a stage interrupted after a checkpoint and run again continues
exactly where the uninterrupted run would be, data draws included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from livestage.training.loop import Stage, read_losses, run_stage


class _Interrupted(Exception):
    pass


def _stage(workdir: Path) -> tuple[Stage, np.random.Generator]:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    rng = np.random.default_rng([3, 1])
    stage = Stage("toy", workdir, {"model": model}, {"model": torch.optim.SGD(model.parameters(), lr=0.1)},
                  steps=8, checkpoint_every=3, data_rng=rng)
    return stage, rng


def _step_fn(stage: Stage, rng: np.random.Generator, stop_at: int | None):
    model = stage.modules["model"]
    opt = stage.optimizers["model"]

    def step(i: int) -> dict[str, float]:
        if i == stop_at:
            raise _Interrupted
        x = torch.as_tensor(rng.normal(size=(4, 2)), dtype=torch.float32)
        noise = torch.randn(4, 1)
        loss = ((model(x) - x.sum(1, keepdim=True) - 0.01 * noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "draw": float(x[0, 0])}

    return step


def test_a_resumed_stage_continues_the_data_draws_instead_of_replaying_them(tmp_path):
    whole, rng = _stage(tmp_path / "whole")
    run_stage(whole, _step_fn(whole, rng, None), log=lambda line: None)
    expected = read_losses(whole.dir / "losses.jsonl")

    cut, rng = _stage(tmp_path / "cut")
    with pytest.raises(_Interrupted):
        run_stage(cut, _step_fn(cut, rng, stop_at=7), log=lambda line: None)  # last checkpoint: step 6
    resumed, rng = _stage(tmp_path / "cut")  # a new process: fresh generators, fresh module
    run_stage(resumed, _step_fn(resumed, rng, None), log=lambda line: None)
    rows = read_losses(resumed.dir / "losses.jsonl")
    after = rows[6:]  # the re-run steps 6 and 7

    assert [r["step"] for r in rows] == list(range(8))  # step 6, logged before the cut, only once
    assert [r["draw"] for r in after] == [r["draw"] for r in expected[6:8]]
    assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in expected[6:8]], rel=1e-6)
