"""Voice activity and end of turn on real Silero VAD, with speech synthesised by Piper."""

from __future__ import annotations

import numpy as np
import pytest

from livestage.speech import TurnDetector, VoiceActivityDetector

RATE = 16000


def voiced_span(audio: np.ndarray) -> tuple[int, int]:
    idx = np.nonzero(np.abs(audio) > 0.02)[0]
    return int(idx[0]), int(idx[-1])


def test_speech_is_bracketed_by_start_and_end_events(vad, spoken, sentences):
    audio = spoken(sentences[0], pad_s=1.0)
    start, end = voiced_span(audio)
    events = TurnDetector(vad).push(audio)
    assert [e.kind for e in events] == ["speech_started", "speech_ended"]
    began, ended = events
    assert start - 0.1 * RATE <= began.sample <= start + 0.3 * RATE
    assert end <= ended.sample <= end + 1.0 * RATE  # decided after end_silence_ms of quiet
    assert not ended.truncated and ended.speech is not None
    assert ended.speech_start <= start and ended.speech_start + ended.speech.size >= end
    assert np.array_equal(ended.speech, audio[ended.speech_start:ended.speech_start + ended.speech.size])


def test_probability_is_high_in_speech_and_low_in_silence(vad, spoken, sentences):
    audio = spoken(sentences[1], pad_s=1.0)
    probs = np.array([vad.probability(audio[i:i + 512]) for i in range(0, audio.size - 511, 512)])
    silent, speech = probs[: RATE // 512 - 2], probs[RATE // 512 + 4: -RATE // 512]
    assert silent.max() < 0.2 and np.median(speech) > 0.8
    with pytest.raises(ValueError, match="samples"):
        vad.probability(np.zeros(100, np.float32))


def test_silence_gives_no_events_and_noise_few(vad):
    assert TurnDetector(vad).push(np.zeros(5 * RATE, np.float32)) == []
    noise = (np.random.default_rng(0).standard_normal(10 * RATE) * 0.05).astype(np.float32)
    assert len(TurnDetector(VoiceActivityDetector()).push(noise)) <= 2


def test_tiny_pushes_give_the_same_events_as_one_big_push(spoken, sentences):
    # comma-free sentences: Piper's pause at a comma varies run to run and can exceed end_silence_ms
    audio = np.concatenate([spoken(sentences[0], 0.6), spoken("I would like a cup of tea please.", 0.6)])
    big = TurnDetector(VoiceActivityDetector()).push(audio)
    detector = TurnDetector(VoiceActivityDetector())
    small = [e for i in range(0, audio.size, 333) for e in detector.push(audio[i:i + 333])]
    single = TurnDetector(VoiceActivityDetector())
    assert single.push(audio[:1]) == [] and single.push(audio[1:511]) == []  # leftovers kept
    assert [(e.kind, e.sample) for e in big] == [(e.kind, e.sample) for e in small]
    assert [e.kind for e in big] == ["speech_started", "speech_ended"] * 2
    assert np.array_equal(big[1].speech, small[1].speech)


def test_an_endless_utterance_is_cut_at_the_cap_and_flagged(piper, sentences):
    from livestage.media.audio import resample_audio

    talk = np.concatenate([resample_audio(piper.synthesize(s), piper.sample_rate, RATE) for s in sentences * 2])
    events = TurnDetector(VoiceActivityDetector(), max_utterance_s=3.0, end_silence_ms=2000).push(talk)
    ended = [e for e in events if e.kind == "speech_ended"]
    assert ended and ended[0].kind == "speech_ended" and ended[0].truncated
    assert ended[0].speech.size <= 3.0 * RATE + 512
    assert events[0].kind == "speech_started" and len(events) >= 3  # talking on starts a new turn


def test_nan_and_inf_are_refused_naming_samples(vad):
    with pytest.raises(ValueError, match="samples"):
        TurnDetector(vad).push(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="samples"):
        TurnDetector(vad).push(np.full(1024, np.inf, np.float32))
