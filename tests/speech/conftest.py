"""Shared speech fixtures: each real model is loaded once per test session (loading costs
seconds, and these tests run on two shared CPU cores), plus small real loopback servers."""

from __future__ import annotations

import socket
from typing import Callable

import numpy as np
import pytest
from aiohttp import web

from livestage.media.audio import resample_audio
from livestage.speech import PiperSynthesizer, VoiceActivityDetector, WhisperRecognizer

SENTENCES = ["Please turn on the kitchen lights at seven o'clock.",
             "The weather is lovely today, so let us go for a walk.",
             "What is your name, and what do you like to do?"]


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    """Reference sentences (what Piper says, what Whisper must hear)."""
    return list(SENTENCES)


@pytest.fixture(scope="session")
def piper() -> PiperSynthesizer:
    return PiperSynthesizer()


@pytest.fixture(scope="session")
def whisper() -> WhisperRecognizer:
    return WhisperRecognizer()


@pytest.fixture
def vad() -> VoiceActivityDetector:
    """Fresh per test: the detector is stateful (one per audio stream)."""
    return VoiceActivityDetector()


@pytest.fixture(scope="session")
def spoken(piper: PiperSynthesizer) -> Callable[..., np.ndarray]:
    """`spoken(text, pad_s)`: the sentence said by Piper at 16 kHz between `pad_s` of silence."""
    cache: dict[tuple[str, float], np.ndarray] = {}

    def make(text: str, pad_s: float = 1.0) -> np.ndarray:
        if (text, pad_s) not in cache:
            voice = resample_audio(piper.synthesize(text), piper.sample_rate, 16000)
            pad = np.zeros(int(pad_s * 16000), np.float32)
            cache[(text, pad_s)] = np.concatenate([pad, voice, pad])
        return cache[(text, pad_s)].copy()

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def serve():
    """`await serve(app)` runs an aiohttp app on a loopback port and returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()
