"""Real speech for the training data: sentences spoken by the offline Piper voice.

The character's voice at run time is the TTS voice (Piper en_US-joe-medium), and the user's voice
is whatever reaches the microphone, so the demo model learns from real speech rather than from a
synthetic signal: a fixed list of sentences is synthesised once with the packaged voice and cached
as one `.npz` file. The user's side of a conversation gets a different-sounding voice by playing
the same synthesiser's output back faster (higher pitch, shorter syllables), which keeps the
listen stream distinguishable from the speak stream without a second voice package.

Sentences are split into a training part and a held-out part (the evaluation's sessions use
sentences the model never heard).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livestage.media.audio import resample_audio

CHARACTER_LINES: tuple[str, ...] = (
    "Hello! I am so glad you came to see me today.",
    "My name is Ada, and I work here at the studio.",
    "I love painting the sea when the light is soft.",
    "That is a wonderful question, let me think about it.",
    "Yes, absolutely, we can do that together.",
    "No, I do not think that would work very well.",
    "The weather has been lovely all week long.",
    "I usually go for a long walk every morning.",
    "Would you like to hear a short story?",
    "Once upon a time there was a tiny boat.",
    "It sailed across the ocean to find a new home.",
    "Music always makes me feel happy and calm.",
    "I play the guitar a little, but not very well.",
    "Let me show you how this works, step by step.",
    "First you open the box, then you take out the map.",
    "Thank you so much for your kind words.",
    "I am not sure, but I will find out for you.",
    "We could meet again tomorrow afternoon.",
    "Blue is my favourite colour, like the sky.",
    "Have you ever seen the mountains in winter?",
    "Cooking is fun, especially with good friends.",
    "I think the answer is seven, but let me check.",
    "Oh really? That sounds very exciting!",
    "Please tell me more about your day.",
    "Goodbye for now, and take good care of yourself.",
    "Reading before bed helps me sleep well.",
    "The library opens at nine in the morning.",
    "Every picture tells a different story.",
    "I would love to travel to a faraway island.",
    "Sometimes the simplest ideas are the best ones.",
    "Let us try again, and this time go slowly.",
    "Wow, that was quick, well done!",
    "Tea or coffee? I always choose tea.",
    "The garden is full of yellow flowers now.",
    "Can you hear the birds singing outside?",
    "I remember my first day here very clearly.",
    "Numbers can be tricky, but practice helps.",
    "What a beautiful evening it is.",
    "I am happy to help with anything you need.",
    "Keep going, you are doing really great.",
)

USER_LINES: tuple[str, ...] = (
    "Hi there, how are you today?",
    "What is your name?",
    "What do you like to do for fun?",
    "Can you tell me a story?",
    "I went to the beach yesterday.",
    "Do you like music?",
    "Where do you live?",
    "That is really interesting.",
    "Could you explain that again, please?",
    "I am feeling a bit tired today.",
    "What time is it now?",
    "Tell me about your favourite place.",
    "I think I understand now, thanks.",
    "Why is the sky blue?",
    "My cat likes to sleep all day.",
    "Do you want to go for a walk?",
    "I have a question about painting.",
    "How long have you worked here?",
    "That was funny!",
    "Okay, see you later.",
    "Can we talk about the weather?",
    "I just finished reading a great book.",
    "What should I cook for dinner?",
    "Thank you, that helps a lot.",
)

HELD_OUT = 6
"""The last `HELD_OUT` lines of each list are kept for evaluation, never trained on."""

USER_SPEEDUP = 1.18
"""The user's voice: the synthesiser's output played this much faster (pitch and tempo up)."""


@dataclass
class SpeechCorpus:
    """Utterances at `sample_rate`, each a float32 array, with their text."""

    sample_rate: int
    character: list[np.ndarray]
    character_text: list[str]
    user: list[np.ndarray]
    user_text: list[str]

    def split(self, held_out: bool) -> "SpeechCorpus":
        """The training utterances (`held_out=False`) or the held-out ones."""
        def part(items: list) -> list:
            return items[-HELD_OUT:] if held_out else items[:-HELD_OUT]
        return SpeechCorpus(self.sample_rate, part(self.character), part(self.character_text),
                            part(self.user), part(self.user_text))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"c{i}": a for i, a in enumerate(self.character)}
        arrays.update({f"u{i}": a for i, a in enumerate(self.user)})
        np.savez(path, sample_rate=self.sample_rate, character_text=np.array(self.character_text),
                 user_text=np.array(self.user_text), **arrays)

    @classmethod
    def load(cls, path: Path) -> "SpeechCorpus":
        with np.load(path) as z:
            ct, ut = [str(s) for s in z["character_text"]], [str(s) for s in z["user_text"]]
            return cls(int(z["sample_rate"]), [z[f"c{i}"] for i in range(len(ct))], ct,
                       [z[f"u{i}"] for i in range(len(ut))], ut)


def _trim(audio: np.ndarray, level: float = 0.01) -> np.ndarray:
    """Drops leading/trailing near-silence (Piper pads sentences), keeping 50 ms around speech."""
    loud = np.nonzero(np.abs(audio) > level)[0]
    if loud.size == 0:
        return audio[:0]
    pad = 800
    return audio[max(0, loud[0] - pad): loud[-1] + pad]


def corpus_clip(raw: np.ndarray, raw_rate: int, sample_rate: int, speedup: float = 1.0) -> np.ndarray:
    """A synthesised line as the corpus keeps it: played `speedup` times faster (resampled as if
    recorded at a higher rate: pitch and tempo up), silence trimmed, peak at 0.6."""
    audio = _trim(resample_audio(raw, int(round(raw_rate * speedup)), sample_rate))
    peak = float(np.abs(audio).max()) if audio.size else 1.0
    return (audio * (0.6 / max(peak, 1e-6))).astype(np.float32)


def synthesize_corpus(sample_rate: int = 16000, voice_dir: str | None = None,
                      character_lines: tuple[str, ...] = CHARACTER_LINES,
                      user_lines: tuple[str, ...] = USER_LINES) -> SpeechCorpus:
    """Speaks every line with the packaged Piper voice (about 30 s on 2 CPU cores)."""
    from livestage.speech.tts import PiperSynthesizer

    tts = PiperSynthesizer(voice_dir)

    def speak(text: str, speedup: float = 1.0) -> np.ndarray:
        return corpus_clip(tts.synthesize(text), tts.sample_rate, sample_rate, speedup)

    return SpeechCorpus(sample_rate, [speak(t) for t in character_lines], list(character_lines),
                        [speak(t, USER_SPEEDUP) for t in user_lines], list(user_lines))


def load_or_synthesize(path: Path, sample_rate: int = 16000) -> SpeechCorpus:
    if path.is_file():
        corpus = SpeechCorpus.load(path)
        if corpus.sample_rate == sample_rate and len(corpus.character) > HELD_OUT and len(corpus.user) > HELD_OUT:
            return corpus
    corpus = synthesize_corpus(sample_rate)
    corpus.save(path)
    return corpus
