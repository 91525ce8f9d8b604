"""Small training inputs built in memory (no Piper, no files)."""

from __future__ import annotations

from livestage.media.samples import sample_speech
from livestage.training.corpus import SpeechCorpus

RATE = 16000


def synthetic_corpus(lines: int = 12, user_seconds: float | None = None) -> SpeechCorpus:
    """Speech-like lines for both sides. The default user lines are short (under the 0.6 s of
    voiced sound after which the renderer nods in the user's pause); `user_seconds` makes them long
    enough for nods."""
    char = [sample_speech(1.0 + 0.3 * (i % 4), RATE, seed=i) for i in range(lines)]
    user = [sample_speech(user_seconds, RATE, seed=100 + i) if user_seconds else
            sample_speech(0.8 + 0.3 * (i % 3), RATE, seed=100 + i) * 0.8 for i in range(lines)]
    return SpeechCorpus(RATE, char, [f"c{i}" for i in range(lines)], user, [f"u{i}" for i in range(lines)])
