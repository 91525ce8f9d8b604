"""Conversation timelines for training and evaluation clips.

A `Scenario` is what happens in a clip, second by second: when the user talks (the listen
stream), when the character answers (the speak stream), the pauses between turns, and which text
directive holds in each chunk. Directives follow the runtime's semantics: a directive set at a
chunk boundary holds until it is changed, so a "nod" span means nodding for those chunks.

Each clip has a pre-roll: the audio windows of chunk k reach 2 s back, so a clip that starts in
the middle of a conversation carries real history; about half the clips start from silence, as a
fresh session does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from livestage.training.corpus import SpeechCorpus

TRAIN_DIRECTIVES: tuple[str, ...] = ("smile", "nod", "look left", "look right")


@dataclass
class Scenario:
    """Audio of both streams over `preroll + chunks` seconds and one directive per chunk."""

    speak: np.ndarray
    listen: np.ndarray
    directives: list[str]  # one per chunk of the clip ("" = none)
    chunks: int
    preroll_s: int
    sample_rate: int
    turns: list[tuple[str, float, float]] = field(default_factory=list)  # (who, start s, end s)

    @property
    def seconds(self) -> int:
        return self.chunks + self.preroll_s

    def renderer_directives(self) -> list[tuple[float, str]]:
        """Directive events in the renderer's timeline (re-issued every second of a span, so
        time-limited actions like a nod repeat for as long as the directive holds)."""
        return [(float(self.preroll_s + k), d) for k, d in enumerate(self.directives) if d]


def _place(track: np.ndarray, audio: np.ndarray, at: int) -> int:
    end = min(track.size, at + audio.size)
    if end > at:
        track[at:end] += audio[: end - at]
    return max(end, at)


def conversation(corpus: SpeechCorpus, chunks: int, rng: np.random.Generator, *,
                 preroll_s: int = 2, directive_prob: float = 0.4,
                 directives: tuple[str, ...] = TRAIN_DIRECTIVES) -> Scenario:
    """A random exchange: the user and the character take turns with short pauses between
    them; sometimes one of them says two sentences in a row, sometimes there is a long silence."""
    rate = corpus.sample_rate
    total = (chunks + preroll_s) * rate
    speak = np.zeros(total, np.float32)
    listen = np.zeros(total, np.float32)
    turns: list[tuple[str, float, float]] = []
    pos = 0 if rng.random() < 0.5 else int(rng.uniform(preroll_s, preroll_s + 1.5) * rate)
    who = "user" if rng.random() < 0.6 else "character"
    while pos < total:
        if rng.random() < 0.12:  # a long silence: both idle
            pos += int(rng.uniform(1.5, 3.0) * rate)
        lines = corpus.user if who == "user" else corpus.character
        audio = lines[int(rng.integers(len(lines)))] * float(rng.uniform(0.6, 1.0))
        end = _place(listen if who == "user" else speak, audio, pos)
        turns.append((who, pos / rate, end / rate))
        pos = end + int(rng.uniform(0.25, 1.2) * rate)
        if rng.random() < 0.75:
            who = "character" if who == "user" else "user"
    per_chunk = [""] * chunks
    if rng.random() < directive_prob and chunks >= 2:
        span = int(rng.integers(2, min(4, chunks) + 1))
        start = int(rng.integers(0, chunks - span + 1))
        text = directives[int(rng.integers(len(directives)))]
        for k in range(start, start + span):
            per_chunk[k] = text
    return Scenario(speak, listen, per_chunk, chunks, preroll_s, rate, turns)


def long_session(corpus: SpeechCorpus, minutes: float, rng: np.random.Generator,
                 preroll_s: int = 0) -> Scenario:
    """An evaluation session: alternating turns for `minutes`, no directives (identity and
    artefacts over time are what it measures)."""
    chunks = int(round(minutes * 60))
    return conversation(corpus, chunks, rng, preroll_s=preroll_s, directive_prob=0.0)


def audio_window(track: np.ndarray, end_sample: int, window: int) -> np.ndarray:
    """The `window` samples of `track` that end at `end_sample`, zeros before its start."""
    start = end_sample - window
    out = np.zeros(window, np.float32)
    lo = max(start, 0)
    if end_sample > lo:
        out[lo - start: end_sample - start] = track[lo:end_sample]
    return out
