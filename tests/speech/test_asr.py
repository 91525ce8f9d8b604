"""Whisper tiny.en on speech synthesised by Piper (a round trip through two real models)."""

from __future__ import annotations

import numpy as np
import pytest

from livestage.speech import StreamingTranscriber, word_error_rate


def test_whisper_transcribes_synthesised_sentences(whisper, spoken, sentences):
    results = [whisper.transcribe(spoken(s, 0.3)) for s in sentences]
    errors = [word_error_rate(s, r.text) for s, r in zip(sentences, results)]
    assert np.mean(errors) <= 0.2 and max(errors) <= 0.34, list(zip(errors, [r.text for r in results]))
    assert all(r.seconds == pytest.approx(spoken(s, 0.3).size / 16000) for s, r in zip(sentences, results))


def test_silence_and_empty_audio_give_empty_text_and_bad_input_is_refused(whisper):
    assert whisper.transcribe(np.zeros(16000, np.float32)).text == ""
    assert whisper.transcribe(np.zeros(0, np.float32)).text == ""
    with pytest.raises(ValueError, match="sample_rate"):
        whisper.transcribe(np.zeros(22050, np.float32), sample_rate=22050)
    with pytest.raises(ValueError, match="samples"):
        whisper.transcribe(np.array([0.1, np.nan] * 8000, np.float32))


def test_streaming_transcriber_gives_partials_then_a_final(whisper, spoken, sentences):
    audio = spoken(sentences[2], 0.2)
    st = StreamingTranscriber(whisper, partial_every_s=1.0)
    partials = [p for i in range(0, audio.size, 1600) if (p := st.push(audio[i:i + 1600]))]
    final = st.finish()
    assert 1 <= len(partials) <= audio.size // 16000
    assert partials[0].lower().startswith("what")
    assert word_error_rate(sentences[2], final) <= 0.2
    assert st.finish() == ""  # finish() reset the utterance
    st.push(audio[:8000])
    st.reset()
    assert st.finish() == ""
