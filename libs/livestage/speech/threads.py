"""Blocking token generators, consumed from asyncio without blocking the event loop, and stopped
as soon as the consumer loses interest.

Barge-in is the reason: when the user starts talking, the dialogue service cancels the reply task
or just stops iterating. The generator runs in a worker thread and checks a stop flag between
tokens, so the CPU goes back to ASR and the next reply within one token (~30 ms here) instead of
finishing a reply nobody will hear.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator

__all__ = ["stream_in_thread"]

_DONE = object()


async def stream_in_thread(produce: Callable[[threading.Event], Iterator[str]],
                           wrap_error: Callable[[Exception], Exception] | None = None) -> AsyncIterator[str]:
    """Yields what `produce(stop)` yields, computed in a thread. `stop` is set when the consumer
    breaks, is cancelled or the generator is closed; `produce` must check it per item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (consumer's asyncio.run ended): nobody listens
            stop.set()

    def work() -> None:
        try:
            for piece in produce(stop):
                if stop.is_set():
                    break
                put(piece)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)
        finally:
            put(_DONE)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, Exception):
                if wrap_error is None:
                    raise item
                raise wrap_error(item) from item
            yield item
    finally:
        stop.set()
        if worker.done() and not worker.cancelled():
            worker.result()
