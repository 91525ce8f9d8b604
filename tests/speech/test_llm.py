"""Replies: the local Gemma GGUF through llama.cpp, and an OpenAI-compatible streaming endpoint
served for real on loopback."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from aiohttp import web

from livestage.speech import FALLBACK_REPLY, ChatTurn, OpenAIChatReplyModel, ReplyModelError

PERSONA = "Ada is a cheerful painter who lives by the sea and loves to talk about colours."


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (built by scripts/setup_env.sh)")
    from livestage.speech import LocalGGUFReplyModel

    return LocalGGUFReplyModel(max_tokens=60)


async def settled(model) -> None:
    """Waits for the worker thread to notice the stop flag and finish its bookkeeping."""
    for _ in range(200):
        if not model.busy:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("generation did not stop within 2 s")


async def collect(model, history: list[ChatTurn], persona: str = PERSONA) -> list[str]:
    return [d async for d in model.stream_reply(persona, history)]


async def test_local_model_answers_briefly_as_one_speaker(gemma):
    for question in ["Hello! What do you like to do?", "What is the capital of France?"]:
        deltas = await collect(gemma, [ChatTurn("user", question)])
        reply = "".join(deltas)
        assert reply.strip() and len(reply) <= 300, reply
        assert not re.search(r"(user|character|visitor)\s*:", reply, re.I) and "\n" not in reply
        assert len(deltas) <= gemma.max_sentences and gemma.last_stats["tokens"] <= gemma.max_tokens
    assert "Paris" in reply


async def test_history_is_used_and_replies_concatenate_into_text(gemma):
    history = [ChatTurn("user", "My name is Tom."), ChatTurn("assistant", "Nice to meet you, Tom!"),
               ChatTurn("user", "What is my name?")]
    reply = "".join(await collect(gemma, history))
    assert "Tom" in reply and "  " not in reply


async def test_generation_stops_when_the_consumer_breaks_or_is_cancelled(gemma):
    long_model_settings = (gemma.max_tokens, gemma.max_sentences)
    gemma.max_tokens, gemma.max_sentences = 200, 20  # it would talk for a long time on its own
    try:
        history = [ChatTurn("user", "Tell me a very long story about the sea, the ships and the sailors.")]
        stream = gemma.stream_reply(PERSONA, history)
        first = await anext(stream)
        at_first = gemma.tokens_generated
        await stream.aclose()
        await settled(gemma)  # the worker notices the flag at its next token (~30 ms)
        assert first.strip() and gemma.last_stats["stopped_early"] == 1
        assert gemma.tokens_generated - at_first <= 8

        async for _ in gemma.stream_reply(PERSONA, history):
            at_break = gemma.tokens_generated
            break  # no aclose(): the event loop finalises the abandoned generator
        await settled(gemma)
        assert gemma.tokens_generated - at_break <= 8 and gemma.last_stats["stopped_early"] == 1

        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in gemma.stream_reply(PERSONA, history):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 30)
        at_cancel = gemma.tokens_generated
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settled(gemma)
        assert gemma.tokens_generated - at_cancel <= 8 and gemma.last_stats["stopped_early"] == 1
    finally:
        gemma.max_tokens, gemma.max_sentences = long_model_settings


async def test_nothing_usable_gives_the_fallback_line(gemma):
    saved = gemma.max_tokens
    gemma.max_tokens = 1  # one token cannot make a sentence
    try:
        reply = "".join(await collect(gemma, [ChatTurn("user", "Describe your day in detail.")]))
    finally:
        gemma.max_tokens = saved
    assert reply == FALLBACK_REPLY


def sse_app(seen: list[dict]) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({**body, "auth": request.headers.get("Authorization", "")})
        if body["messages"][-1]["content"] == "fail":
            return web.Response(status=500, text="model overloaded")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keep-alive\n\n")
        await resp.write(b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n')
        for piece in ["Hel", "lo", " there."]:
            await resp.write(f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write(b'data: {"choices": [{"delta": {"content": "after done"}}]}\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_openai_compatible_endpoint_streams_deltas(serve):
    seen: list[dict] = []
    base = await serve(sse_app(seen))
    model = OpenAIChatReplyModel(base + "/v1/", api_key="k", model="m")
    history = [ChatTurn("user", "hi"), ChatTurn("assistant", "hello"), ChatTurn("user", "how are you?")]
    assert await collect(model, history, "You are Ada.") == ["Hel", "lo", " there."]
    body = seen[0]
    assert body["stream"] is True and body["model"] == "m" and body["auth"] == "Bearer k"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "You are Ada."


async def test_openai_compatible_endpoint_errors_raise_reply_model_error(serve):
    base = await serve(sse_app([]))
    with pytest.raises(ReplyModelError, match="500.*model overloaded"):
        await collect(OpenAIChatReplyModel(base + "/v1"), [ChatTurn("user", "fail")])
    with pytest.raises(ReplyModelError, match="ConnectError"):
        await collect(OpenAIChatReplyModel("http://127.0.0.1:9/v1", timeout_s=2), [ChatTurn("user", "hi")])


def test_a_missing_model_path_is_named_in_the_error(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (built by scripts/setup_env.sh)")
    from livestage.speech import LocalGGUFReplyModel

    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        LocalGGUFReplyModel(model_path=str(tmp_path / "nowhere.gguf"))
