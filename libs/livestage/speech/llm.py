"""Replies: a small local language model, or any OpenAI-compatible chat endpoint, streamed as
text deltas so the first sentence can be spoken while the rest is still being written.

The built-in model is Gemma-3-270M *base* through llama.cpp; see `reply_text` for why its prompt
and output are handled as they are. If it produces nothing usable, a fallback line is said, so
the user is never left in silence. An OpenAI-compatible endpoint (vLLM, llama.cpp server, hosted
APIs) takes the persona as the system message and is trusted to answer as one speaker.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator, Protocol

from livestage.observability import get_logger
from livestage.speech.assets import ASSETS
from livestage.speech.reply_text import FALLBACK_REPLY, STOP_STRINGS, ChatTurn, ReplyGuard, build_prompt
from livestage.speech.threads import stream_in_thread

__all__ = ["ChatTurn", "LocalGGUFReplyModel", "OpenAIChatReplyModel", "ReplyModel", "ReplyModelError"]

log = get_logger("livestage.speech.llm")


class ReplyModelError(RuntimeError):
    """The model or endpoint failed (the message says how: status, body excerpt, cause)."""


class ReplyModel(Protocol):
    """What the dialogue service needs: the character's reply as a stream of text deltas.
    Stopping iteration (or cancelling the consuming task) must stop generation promptly."""

    def stream_reply(self, persona: str, history: list[ChatTurn]) -> AsyncIterator[str]: ...


class LocalGGUFReplyModel:
    """Gemma-3-270M base (Q4_K_M GGUF from registry packages, or any GGUF by path) via llama.cpp.

    One generation at a time per model (llama.cpp contexts are not re-entrant); consecutive turns
    share the prompt prefix, which llama.cpp reuses from its KV cache, so only new lines are
    evaluated."""

    def __init__(self, model_path: str | None = None, n_threads: int = 2, max_tokens: int = 60,
                 n_ctx: int = 2048, max_sentences: int = 3, seed: int = 0,
                 cache_dir: str | None = None):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ReplyModelError("llama-cpp-python is not installed (see scripts/setup_env.sh)") from exc
        if model_path:
            if not Path(model_path).is_file():
                raise FileNotFoundError(f"llm model file {model_path} does not exist")
            path = Path(model_path)
        else:
            path = ASSETS["llm"].file(cache_dir=cache_dir)
        started = time.perf_counter()
        self._llm = Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, seed=seed, verbose=False)
        self.n_ctx = n_ctx
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences
        self._lock = threading.Lock()
        self.tokens_generated = 0
        """Tokens generated over this model's life (benchmarks; tests of early stopping)."""
        self.last_stats: dict[str, float] = {}
        """Of the last reply: prompt_tokens, tokens, first_token_s, seconds, stopped_early."""
        log.info("reply_model_loaded", path=str(path), seconds=round(time.perf_counter() - started, 2))

    @property
    def busy(self) -> bool:
        """A generation is running (or still winding down after its consumer left)."""
        return self._lock.locked()

    def _fit_prompt(self, persona: str, history: list[ChatTurn]) -> tuple[str, int]:
        """The prompt with as many recent turns as fit in the context next to the reply."""
        turns = list(history)
        while True:
            prompt = build_prompt(persona, turns)
            n = len(self._llm.tokenize(prompt.encode(), add_bos=True))
            if n + self.max_tokens <= self.n_ctx or len(turns) <= 1:
                return prompt, n
            turns = turns[1:]

    def _generate(self, persona: str, history: list[ChatTurn], stop: threading.Event) -> Iterator[str]:
        with self._lock:
            started = time.perf_counter()
            prompt, prompt_tokens = self._fit_prompt(persona, history)
            guard = ReplyGuard(self.max_sentences)
            stats = {"prompt_tokens": prompt_tokens, "tokens": 0, "first_token_s": 0.0, "stopped_early": 0}
            finish_reason = None
            for chunk in self._llm(prompt, max_tokens=self.max_tokens, temperature=0.0, stop=STOP_STRINGS,
                                   stream=True):
                self.tokens_generated += 1
                stats["tokens"] += 1
                if stats["tokens"] == 1:
                    stats["first_token_s"] = time.perf_counter() - started
                choice = chunk["choices"][0]
                finish_reason = choice.get("finish_reason") or finish_reason
                yield from guard.feed(choice["text"])
                if stop.is_set():
                    stats["stopped_early"] = 1
                    break
                if guard.finished:
                    break
            if not stop.is_set():
                yield from guard.finish(cut_by_length=finish_reason == "length")
                if not guard.said:
                    yield FALLBACK_REPLY
            stats["seconds"] = time.perf_counter() - started
            self.last_stats = stats

    async def stream_reply(self, persona: str, history: list[ChatTurn]) -> AsyncIterator[str]:
        """The reply, a sentence per delta (later ones start with a space, so deltas concatenate)."""
        async for piece in stream_in_thread(lambda stop: self._generate(persona, history, stop),
                                            lambda exc: ReplyModelError(f"local reply model failed: {exc}")):
            yield piece


class OpenAIChatReplyModel:
    """Any OpenAI-compatible `POST {base_url}/chat/completions` with `stream: true`: reads the SSE
    `data:` lines, yields `choices[0].delta.content`, ends at `data: [DONE]`."""

    def __init__(self, base_url: str, api_key: str = "", model: str = "", timeout_s: float = 30.0,
                 max_tokens: int = 120, temperature: float = 0.7):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature

    def _body(self, persona: str, history: list[ChatTurn]) -> dict:
        messages = [{"role": "system", "content": persona or "You are a friendly character. Answer briefly."}]
        messages += [{"role": t.role, "content": t.text} for t in history]
        return {"model": self.model, "messages": messages, "stream": True, "max_tokens": self.max_tokens,
                "temperature": self.temperature}

    async def stream_reply(self, persona: str, history: list[ChatTurn]) -> AsyncIterator[str]:
        """Closing the generator (break, cancel) closes the HTTP stream, which stops the server."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                async with client.stream("POST", self.url, json=self._body(persona, history),
                                         headers=headers) as resp:
                    if resp.status_code >= 400:
                        body = (await resp.aread()).decode(errors="replace")[:300]
                        raise ReplyModelError(f"{self.url} answered HTTP {resp.status_code}: {body}")
                    async for line in resp.aiter_lines():
                        delta = _sse_delta(line, self.url)
                        if delta is None:
                            return
                        if delta:
                            yield delta
        except httpx.HTTPError as exc:
            raise ReplyModelError(f"{self.url}: {type(exc).__name__}: {exc}") from exc


def _sse_delta(line: str, url: str) -> str | None:
    """The content delta of one SSE line: "" for lines without content, None at `[DONE]`."""
    if not line.startswith("data:"):
        return ""  # blank separators, comments (": keep-alive"), `event:` lines
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        event = json.loads(data)
    except ValueError:
        raise ReplyModelError(f"{url}: malformed stream event {data[:120]!r}") from None
    if isinstance(event, dict) and "error" in event:
        raise ReplyModelError(f"{url}: error in stream: {str(event['error'])[:300]}")
    try:
        choices = event.get("choices") or []  # usage-only chunks carry no choices
        return (choices[0].get("delta") or {}).get("content") or "" if choices else ""
    except (TypeError, AttributeError):
        raise ReplyModelError(f"{url}: malformed stream event {data[:120]!r}") from None
