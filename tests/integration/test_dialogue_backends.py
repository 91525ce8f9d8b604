"""The dialogue service's external backends, end to end with real processes: replies streamed
from an OpenAI-compatible chat endpoint, and an external audio-to-audio system whose speech
becomes the character's. The endpoints are small real HTTP/WebSocket servers in the test."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiohttp import web

from livestage.devstack.demo import SampleCharacter
from livestage.devstack.stack import LocalStack
from livestage.protos import session_pb2 as pb

from .helpers import BackgroundHttpServer, pcm16, stub
from .test_conversation import Events, _open


CHAT_PIECES = ["My name is Ada", ". I love painting", " by the sea."]


class FakeChatEndpoint:
    """An OpenAI-compatible streaming chat endpoint that records what it was sent."""

    def __init__(self):
        self.requests: list[dict] = []
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.server = BackgroundHttpServer(app)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"auth": request.headers.get("Authorization"), **await request.json()})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in CHAT_PIECES:
            await resp.write(f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n".encode())
            await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture(scope="module")
def openai_stack(tmp_path_factory):
    endpoint = FakeChatEndpoint()
    s = LocalStack(tmp_path_factory.mktemp("openai"), preset="tiny", conversation=True,
                   env={"LIVESTAGE_DIALOGUE_BACKEND": "openai",
                        "LIVESTAGE_LLM_BASE_URL": f"http://127.0.0.1:{endpoint.server.port}/v1",
                        "LIVESTAGE_LLM_MODEL": "test-model", "LIVESTAGE_LLM_API_KEY": "secret-key"})
    try:
        s.start(timeout=240)
        s.endpoint = endpoint
        yield s
    finally:
        s.stop()
        endpoint.server.stop()


async def test_replies_stream_from_an_openai_compatible_endpoint_and_are_spoken(openai_stack):
    requests = openai_stack.endpoint.requests
    channel, client = stub(openai_stack)
    try:
        sid = await _open(client)
        events = Events(client, sid)
        await client.StartSession(pb.SessionRef(session_id=sid))
        await client.SendText(pb.SendTextRequest(session_id=sid, text="Who are you?"))
        await events.wait(lambda: events.turns(pb.TURN_KIND_SPEECH_STARTED), timeout=120)
        text = "".join(r.delta for r in events.of("reply_text"))
        assert text == "".join(CHAT_PIECES)
        sent = requests[0]
        assert sent["auth"] == "Bearer secret-key" and sent["stream"] is True and sent["model"] == "test-model"
        assert sent["messages"][0]["role"] == "system" and "Ada" in sent["messages"][0]["content"]
        assert sent["messages"][-1] == {"role": "user", "content": "Who are you?"}
        await client.EndSession(pb.SessionRef(session_id=sid))
        events.task.cancel()
    finally:
        await channel.close()


class FakeAudioToAudio:
    """An external audio-to-audio system over WebSocket: hears 2 s of the user, then answers
    with a transcript, reply text and 2 s of a 220 Hz tone at 24 kHz as its speech."""

    def __init__(self):
        self.heard = bytearray()
        app = web.Application()
        app.router.add_get("/a2a", self.a2a)
        self.server = BackgroundHttpServer(app)

    async def a2a(self, request: web.Request) -> web.WebSocketResponse:
        tone = (np.sin(np.arange(24000 * 2) * 2 * np.pi * 220 / 24000) * 12000).astype("<i2")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"type": "format", "sample_rate": 24000}))
        answered = False
        async for msg in ws:
            self.heard.extend(msg.data)
            if len(self.heard) >= 2 * 16000 * 2 and not answered:  # 2 s of the user: answer
                answered = True
                await ws.send_str(json.dumps({"type": "transcript", "text": "hello there"}))
                await ws.send_str(json.dumps({"type": "reply_text", "text": "Hi, I am Ada."}))
                await ws.send_bytes(tone.tobytes())
                await ws.send_str(json.dumps({"type": "end"}))
        return ws


@pytest.fixture(scope="module")
def a2a_stack(tmp_path_factory):
    system = FakeAudioToAudio()
    s = LocalStack(tmp_path_factory.mktemp("a2a"), preset="tiny", conversation=True,
                   env={"LIVESTAGE_DIALOGUE_BACKEND": "a2a",
                        "LIVESTAGE_A2A_URL": f"ws://127.0.0.1:{system.server.port}/a2a"})
    try:
        s.start(timeout=240)
        s.system = system
        yield s
    finally:
        s.stop()
        system.server.stop()


async def test_an_external_audio_to_audio_system_hears_the_user_and_speaks_for_the_character(a2a_stack):
    heard = a2a_stack.system.heard
    channel, client = stub(a2a_stack)
    try:
        sid = await _open(client)
        events = Events(client, sid)
        await client.StartSession(pb.SessionRef(session_id=sid))
        question = SampleCharacter.load().question

        async def frames():
            for i in range(0, question.size, 1600):
                yield pb.AudioChunk(session_id=sid, pcm16=pcm16(question[i:i + 1600]), sample_rate=16000, channels=1)
                await asyncio.sleep(0.02)

        await client.PushUserAudio(frames())
        await events.wait(lambda: events.turns(pb.TURN_KIND_SPEECH_STARTED), timeout=120)
        assert len(heard) >= 2 * 16000 * 2 and len(heard) % 2 == 0  # the user's voice, as 16-bit PCM
        assert [t.text for t in events.of("transcript") if t.speaker == "user"] == ["hello there"]
        assert "".join(r.delta for r in events.of("reply_text")) == "Hi, I am Ada."
        assert events.turns(pb.TURN_KIND_REPLY_FINISHED)
        await client.EndSession(pb.SessionRef(session_id=sid))
        events.task.cancel()
    finally:
        await channel.close()
