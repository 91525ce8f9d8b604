"""The services end to end with `LIVESTAGE_BACKEND=triton`: every stage's engine runs inside a
real Triton server; the stream equals the in-process runtime's for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from livestage.devstack.stack import LocalStack
from livestage.media.image import decode_image
from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.protos import session_pb2 as pb
from livestage.runtime.pipeline import InProcessChunkPipeline
from livestage.runtime.session_runtime import SessionRuntime
from livestage.transport import NatsBus

from .helpers import FramesListener, character, png_bytes, stub

pytest.importorskip("tritonclient")
PRESET = get_preset("tiny")


@pytest.fixture(scope="module")
def triton_stack(tmp_path_factory):
    s = LocalStack(tmp_path_factory.mktemp("tstack"), preset="tiny", backend="triton",
                   env={"LIVESTAGE_STAGE_TIMEOUT_S": "20"})
    s.start(timeout=240)
    yield s
    s.stop()


async def _in_process_frames(n: int) -> list[np.ndarray]:
    models = build_models("tiny", None, seed=0)
    image = decode_image(png_bytes(), (PRESET.height, PRESET.width))
    pipeline = InProcessChunkPipeline(models, [("global", image)], seed=0, lookahead=2)
    frames: list[np.ndarray] = []

    async def on_chunk(d) -> None:
        frames.append(d.frames)

    runtime = SessionRuntime("ref", PRESET.chunk, pipeline, lookahead=2, realtime=False, on_chunk=on_chunk)
    await runtime.run(max_chunks=n)
    return frames


async def test_services_on_triton_stream_what_the_in_process_runtime_makes(triton_stack):
    channel, client = stub(triton_stack)
    bus = await triton_stack.connect_bus()
    s = await client.CreateSession(pb.CreateSessionRequest(
        character=character(), options=pb.SessionOptions(realtime=False, seed=0)))
    listener = await FramesListener(bus, s.session_id).start()
    await client.StartSession(pb.SessionRef(session_id=s.session_id))
    await listener.wait_for(4, timeout=120)
    await client.EndSession(pb.SessionRef(session_id=s.session_id))
    assert listener.indices[:4] == [0, 1, 2, 3]
    expected = await _in_process_frames(4)
    for (_, _, got, _), want in zip(listener.chunks[:4], expected):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    await bus.close()
    await channel.close()

