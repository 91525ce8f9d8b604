"""Piper offline, and the OpenAI-compatible speech endpoint against a real loopback server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiohttp import web

from livestage.speech import HttpSpeechSynthesizer, SpeechSynthesisError


def test_piper_speaks_at_22050_hz_with_length_following_the_text(piper):
    short = piper.synthesize("Hello.")
    long = piper.synthesize("Hello, it is lovely to meet you here today, my friend.")
    assert piper.sample_rate == 22050 and short.dtype == np.float32 and short.ndim == 1
    assert np.sqrt(np.mean(long ** 2)) > 0.02 and np.abs(long).max() <= 1.0
    assert long.size > 2.5 * short.size and 0.3 * 22050 < short.size < 2.0 * 22050
    assert piper.synthesize("   \n").size == 0 and piper.synthesize("").dtype == np.float32


async def test_piper_async_runs_off_the_event_loop_and_gives_the_same_speech(piper):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    text = "Good morning, and welcome to the gallery by the sea."
    audio = await piper.synthesize_async(text)
    task.cancel()
    sync = piper.synthesize(text)  # VITS samples durations and noise: lengths agree roughly
    assert ticks >= 3  # the loop kept running while the voice worked
    assert audio.dtype == np.float32 and abs(audio.size - sync.size) < 0.3 * sync.size
    assert np.sqrt(np.mean(audio ** 2)) > 0.02


async def test_http_speech_endpoint_is_called_openai_style(serve):
    tone = (np.sin(np.arange(2400) / 5) * 10000).astype("<i2")
    seen: list[dict] = []

    async def speech(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append({**body, "auth": request.headers.get("Authorization", "")})
        if body["input"] == "fail":
            return web.Response(status=503, text="voice busy")
        return web.Response(body=tone.tobytes())

    app = web.Application()
    app.router.add_post("/v1/audio/speech", speech)
    base = await serve(app)
    synth = HttpSpeechSynthesizer(base + "/v1", api_key="sk-test", voice="alloy", sample_rate=24000)
    audio = await synth.synthesize_async("hi", "nova")
    assert audio.dtype == np.float32 and audio.size == tone.size
    assert np.allclose(audio * 32768, tone, atol=1)
    assert seen[0] == {"model": "tts-1", "input": "hi", "voice": "nova", "response_format": "pcm",
                       "auth": "Bearer sk-test"}
    sync_audio = await asyncio.to_thread(synth.synthesize, "hi")
    assert np.array_equal(sync_audio, audio) and seen[1]["voice"] == "alloy"
    assert (await synth.synthesize_async("  ")).size == 0 and len(seen) == 2  # no request
    with pytest.raises(SpeechSynthesisError, match="503.*voice busy"):
        await synth.synthesize_async("fail")
