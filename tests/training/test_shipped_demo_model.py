"""The shipped demo weights do what they were trained for, measured on their own output: the
mouth region moves more while the character speaks than while it is silent, and the character
keeps the reference's colours (it is not noise, and it is the sample character)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from livestage.media.samples import SampleCharacter
from livestage.models.bundle import build_models, shipped_weights_dir
from livestage.models.weights import weights_digest
from livestage.runtime.pipeline import StreamingAvatar

pytestmark = pytest.mark.skipif(shipped_weights_dir("demo") is None, reason="no trained demo weights")

REPORT = Path(__file__).resolve().parents[2] / "docs" / "evaluation" / "report.json"
MOUTH = (slice(64, 92), slice(40, 88))  # rows, columns of the mouth area at 128x128


def _run(models, speak: np.ndarray, chunks: int) -> np.ndarray:
    sample = SampleCharacter.load()
    avatar = StreamingAvatar(models, sample.reference_images((128, 128)), seed=0)
    avatar.push_speak_audio(speak)
    return np.concatenate([avatar.step().frames for _ in range(chunks)]).astype(np.float32)


def _mouth_motion(frames: np.ndarray) -> float:
    region = frames[:, MOUTH[0], MOUTH[1]]
    return float(np.abs(np.diff(region, axis=0)).mean())


@pytest.fixture(scope="module")
def runs():
    models = build_models("demo", allow_seeded=False)
    answer = SampleCharacter.load().answer
    speaking = _run(models, answer[: 4 * 16000], 4)
    silent = _run(models, np.zeros(4 * 16000, np.float32), 4)
    return speaking, silent


def test_the_mouth_moves_more_while_speaking_than_while_silent(runs):
    speaking, silent = runs
    # skip the first chunk: both runs start from the same reference-anchored first frames
    assert _mouth_motion(speaking[24:]) > 1.2 * _mouth_motion(silent[24:])


def test_frames_keep_the_reference_colours_and_are_not_noise(runs):
    speaking, _ = runs
    sample = SampleCharacter.load()
    ref = (sample.reference_images((128, 128))[0][1].permute(1, 2, 0).numpy() + 1) * 127.5
    mean_error = np.abs(speaking.mean(axis=(0, 1, 2)) - ref.mean(axis=(0, 1))).mean()
    assert mean_error < 40  # the image's average colour is the character's
    # a trained model's frames are smooth: neighbouring pixels are close (noise is not)
    assert np.abs(np.diff(speaking, axis=2)).mean() < 12


def test_the_committed_evaluation_report_is_of_the_shipped_weights():
    """Weights re-trained and shipped without re-running the evaluation would leave docs/ describing
    another model: the report's digests must be the shipped files'."""
    report = json.loads(REPORT.read_text())
    assert report["preset"] == "demo" and report["weights"]["dir"] == "shipped demo weights"
    assert report["weights"]["sha256"] == weights_digest(shipped_weights_dir("demo"))
