"""The session runtime in-process: lookahead bound, state machine, interrupts that roll every
stage back exactly, and the synchronous StreamingAvatar."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from livestage.media.samples import sample_character, sample_speech
from livestage.models.bundle import build_models
from livestage.runtime.pipeline import InProcessChunkPipeline
from livestage.runtime.session_runtime import ChunkDelivery, SessionRuntime
from livestage.runtime.session_state import SessionState, SessionStateMachine

RATE = 16000


@pytest.fixture(scope="module")
def models():
    return build_models("tiny", None, seed=0)


def _runtime(models, lookahead=2):
    p = models.preset
    pipeline = InProcessChunkPipeline(models, [("global", sample_character((p.height, p.width)))],
                                      seed=3, lookahead=lookahead)
    delivered, events, ahead = [], [], []

    async def on_chunk(d):
        delivered.append(d)
        ahead.append(runtime.next_submit - runtime.played)

    async def sink(kind, payload):
        events.append((kind, payload))

    runtime = SessionRuntime("s", p.chunk, pipeline, lookahead=lookahead, realtime=False,
                             events=sink, on_chunk=on_chunk)
    return runtime, delivered, events, ahead


async def test_lookahead_is_bounded_and_states_follow_the_audio(models):
    runtime, delivered, events, ahead = _runtime(models, lookahead=2)
    speech = np.concatenate([np.zeros(2 * RATE, np.float32), sample_speech(2.0, RATE, 1)])
    runtime.push_speak_audio(speech)
    runtime.push_listen_audio(sample_speech(1.0, RATE, 2))
    await runtime.run(max_chunks=7)
    assert [d.chunk_index for d in delivered] == list(range(7))
    assert max(ahead) <= 2
    states = [(p["from"], p["to"]) for k, p in events if k == "state"]
    assert states[0] == ("warmup", "listening")
    assert ("listening", "idle") in states and ("idle", "responding") in states
    assert states[-1][1] == "ended"
    assert [d.speaking for d in delivered] == [False, False, True, True, False, False, False]


async def test_interrupt_rolls_back_exactly_to_the_chunk_playing(models):
    speech = sample_speech(10.0, RATE, 4)
    a, delivered_a, events_a, _ = _runtime(models)
    a.push_speak_audio(speech)
    await a.run(max_chunks=2)  # chunks 0, 1 played; chunk 2 already generated ahead (with speech)
    assert a.next_submit == 3
    last_kept = await a.interrupt()
    assert last_kept == 1
    await a.run(max_chunks=5)
    b, delivered_b, _, _ = _runtime(models)
    b.push_speak_audio(speech[:2 * RATE])  # what was left after the interrupt
    await b.run(max_chunks=5)
    assert [d.chunk_index for d in delivered_a] == list(range(5))
    assert all(d.epoch == 1 and not d.speaking for d in delivered_a[2:])
    for da, db in zip(delivered_a, delivered_b):
        np.testing.assert_array_equal(da.frames, db.frames)  # caches were rolled back exactly
    assert ("interrupted", {"last_kept_chunk": 1, "epoch": 1}) in events_a


def test_state_machine_rejects_nothing_legal_and_ends_once():
    sm = SessionStateMachine()
    assert sm.on_chunk(0, speaking=False, user_speaking=False).current == SessionState.IDLE
    assert sm.on_chunk(1, speaking=True, user_speaking=True).current == SessionState.RESPONDING
    assert sm.on_interrupt(1).current == SessionState.LISTENING
    assert sm.on_interrupt(2) is None
    assert sm.end(3).current == SessionState.ENDED
    assert sm.on_chunk(4, True, False) is None


class _ImmediatePipeline:
    """A pipeline whose chunks are ready the moment they are submitted, and whose
    `next_delivery`, when cancelled with a chunk already waiting, returns that chunk instead of
    raising (what `asyncio.wait_for` around a queue does in Python 3.11 when the item arrives as
    the wait is cancelled: the distributed pipeline's case)."""

    def __init__(self, samples_per_chunk: int):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.samples = samples_per_chunk

    async def submit(self, request) -> None:
        self.queue.put_nowait(ChunkDelivery(
            request.session_id, request.chunk_index, request.epoch, np.zeros((1, 2, 2, 3), np.uint8),
            np.zeros(self.samples, np.float32), speaking=False, user_speaking=False))

    async def next_delivery(self) -> ChunkDelivery:
        try:
            return await self.queue.get()
        except asyncio.CancelledError:
            if not self.queue.empty():
                return self.queue.get_nowait()
            raise

    async def rollback(self, session_id, last_kept_chunk, epoch) -> None:
        return None

    async def recover(self, last_kept_chunk, epoch, dead_stages, history) -> None:
        return None

    async def play(self, delivery, state) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_playback_report_while_waiting_never_loses_a_chunk(models):
    # Playback reports lag one chunk behind, so the runtime often waits on an empty pipeline
    # and a report wakes it to submit the next chunk, which is ready at once. A runtime that
    # cancelled its pending wait on that wake-up lost the chunk and stalled for good.
    chunk = models.preset.chunk
    runtime = SessionRuntime("s", chunk, _ImmediatePipeline(chunk.samples_per_chunk), lookahead=1,
                             realtime=False)

    async def publisher() -> None:
        while True:
            runtime.report_playback(runtime.played - 2)
            await asyncio.sleep(0.005)

    reporting = asyncio.create_task(publisher())
    try:
        await asyncio.wait_for(runtime.run(max_chunks=30), timeout=20)
    finally:
        reporting.cancel()
    assert runtime.delivered == list(range(30))
