"""The audio-to-audio client against a real WebSocket server on loopback that speaks the
protocol in `livestage.speech.a2a`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from aiohttp import web

from livestage.speech import AudioToAudioClient


def a2a_app(received: list[bytes]) -> web.Application:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            received.append(msg.data)
            if len(received) < 2:
                continue  # answer once the whole utterance is in
            await ws.send_str(json.dumps({"type": "transcript", "text": "hello"}))
            await ws.send_bytes(np.full(240, 1000, "<i2").tobytes())  # at the default 24 kHz
            await ws.send_str(json.dumps({"type": "format", "sample_rate": 16000}))
            await ws.send_str("not json")
            await ws.send_str(json.dumps({"type": "reply_text", "text": "Hi there!"}))
            await ws.send_bytes(np.full(160, -2000, "<i2").tobytes() + b"\x01")  # odd trailing byte
            await ws.send_str(json.dumps({"type": "something_new"}))
            await ws.send_str(json.dumps({"type": "end"}))
            await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/a2a", handler)
    return app


async def test_audio_goes_up_and_speech_and_text_come_back_in_order(serve):
    received: list[bytes] = []
    base = await serve(a2a_app(received))
    chunks = [np.zeros(320, "<i2").tobytes(), np.arange(160, dtype="<i2").tobytes()]
    async with AudioToAudioClient(base.replace("http", "ws") + "/a2a") as client:
        for chunk in chunks:
            await client.send_audio(chunk)
        events = [ev async for ev in client]
    assert received == chunks
    assert [e.kind for e in events] == ["transcript", "audio", "reply_text", "audio", "end"]
    assert events[0].text == "hello" and events[2].text == "Hi there!"
    assert events[1].sample_rate == 24000 and np.allclose(events[1].audio, 1000 / 32768)
    assert events[3].sample_rate == 16000 and events[3].audio.size == 160
    assert events[3].audio.dtype == np.float32 and np.allclose(events[3].audio, -2000 / 32768)


async def test_misuse_is_reported(serve):
    base = await serve(a2a_app([]))
    client = AudioToAudioClient(base.replace("http", "ws") + "/a2a")
    with pytest.raises(RuntimeError, match="connect"):
        await client.send_audio(b"\x00\x00")
    await client.connect()
    try:
        with pytest.raises(ValueError, match="pcm16"):
            await client.send_audio(b"\x00\x00\x00")
    finally:
        await client.close()
    with pytest.raises(Exception):
        await AudioToAudioClient(base.replace("http", "ws") + "/no-such-path").connect()
