"""The procedural talking-character renderer (training data of the demo model)."""

from __future__ import annotations

import numpy as np
import pytest

from livestage.media.samples import sample_speech
from livestage.training.renderer import FaceState, Identity, MotionModel, references, render_clip, render_face

SR, FPS = 16000, 12
SPEECH = sample_speech(3.0, SR, seed=1)
SILENCE = np.zeros(3 * SR, np.float32)


def test_same_seed_same_clip_and_identities_differ():
    a = render_clip(Identity.sample(5), SPEECH, SILENCE, fps=FPS, size=(64, 64), seed=2)
    b = render_clip(Identity.sample(5), SPEECH, SILENCE, fps=FPS, size=(64, 64), seed=2)
    assert np.array_equal(a.frames, b.frames) and a.frames.shape == (36, 64, 64, 3)
    others = {Identity.sample(s) for s in range(8)}
    assert len(others) == 8
    portraits = [render_face(Identity.sample(s), FaceState(), (64, 64)) for s in range(4)]
    assert min(np.abs(p.astype(int) - portraits[0]).mean() for p in portraits[1:]) > 5


def test_speech_moves_the_mouth_and_silence_does_not():
    idn = Identity.sample(1)
    talking = render_clip(idn, SPEECH, SILENCE, fps=FPS, size=(64, 64))
    quiet = render_clip(idn, SILENCE, SILENCE, fps=FPS, size=(64, 64))
    assert max(s.mouth_open for s in talking.states) > 0.3
    assert max(s.mouth_open for s in quiet.states) == 0.0
    # the mouth region (lower middle of the face) changes much more while talking
    def mouth_motion(frames):
        region = frames[:, 34:50, 20:44].astype(float)
        return np.abs(np.diff(region, axis=0)).mean()
    assert mouth_motion(talking.frames) > 2 * mouth_motion(quiet.frames)


def test_listening_nods_in_the_users_pauses_and_keeps_the_mouth_still():
    user = np.concatenate([sample_speech(2.0, SR, seed=3), np.zeros(2 * SR, np.float32)])
    states = MotionModel(FPS, seed=0).run(np.zeros(4 * SR, np.float32), user, SR, 4 * FPS)
    pitch = np.array([s.pitch for s in states])
    assert np.abs(pitch[: 2 * FPS]).max() < 1e-6  # attentive while the user talks
    assert np.abs(pitch[2 * FPS:]).max() > 5       # a nod after they stop
    assert all(s.mouth_open == 0.0 for s in states)
    assert any(s.smile > 0 for s in states[: 2 * FPS])


@pytest.mark.parametrize("directive,check", [
    ("smile", lambda s: s.smile == 1.0),
    ("look left", lambda s: s.yaw < -20 and s.gaze_x < 0),
    ("look right", lambda s: s.yaw > 20 and s.gaze_x > 0),
    ("nod", lambda s: abs(s.pitch) > 1),
])
def test_directives_change_the_motion(directive, check):
    plain = MotionModel(FPS).run(SILENCE, SILENCE, SR, 3 * FPS)
    directed = MotionModel(FPS).run(SILENCE, SILENCE, SR, 3 * FPS, [(1.0, directive)])
    window = range(FPS + 1, FPS + 4)
    assert all(check(directed[i]) for i in window)
    assert not all(check(plain[i]) for i in window)


def test_unknown_directive_is_refused_and_references_have_every_kind():
    with pytest.raises(ValueError, match="dance"):
        render_clip(Identity.sample(0), SILENCE, SILENCE, fps=FPS, size=(32, 32), directives=[(0.0, "dance")])
    refs = references(Identity.sample(0), (64, 64))
    assert [len(refs[k]) for k in ("global", "view", "expression")] == [1, 2, 3]
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for imgs in refs.values() for img in imgs)
    assert np.abs(refs["view"][0].astype(int) - refs["view"][1]).mean() > 1
