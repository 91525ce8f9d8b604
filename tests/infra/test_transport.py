"""NATS transport against a real nats-server: codec, split payloads, request/reply, trace context."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from livestage.devstack import start_nats
from livestage.observability.tracing import configure_tracing, extract_context, tracer
from livestage.transport import NatsBus, StageMessage, Subjects, decode_message, encode_message


def test_codec_roundtrip_of_several_dtypes_and_shapes():
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros((0, 5), np.int64),
               "c": np.array(7, dtype=np.uint8), "d": np.random.rand(2, 3, 4).astype(np.float16)}
    msg = StageMessage("chunk", "s1", 5, 2, {"k": "v"}, tensors)
    out = decode_message(encode_message(msg))
    assert (out.kind, out.session_id, out.chunk_index, out.epoch, out.meta) == ("chunk", "s1", 5, 2, {"k": "v"})
    for k, v in tensors.items():
        assert out.tensors[k].dtype == v.dtype and out.tensors[k].shape == v.shape
        np.testing.assert_array_equal(out.tensors[k], v)
    with pytest.raises(ValueError, match="truncated"):
        decode_message(encode_message(msg)[:-3])
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_message(StageMessage("x", tensors={"o": np.array(["s"], dtype=object)}))


def test_subjects_are_sanitised():
    assert Subjects.worker("generator", "gen.1*>") == "ls.generator.gen_1__"
    assert Subjects.session_frames("a b") == "ls.session.a_b.frames"
    with pytest.raises(ValueError):
        Subjects.worker("generator", "")


async def test_large_tensor_crosses_a_server_with_small_max_payload(tmp_path):
    server = start_nats(tmp_path, max_payload="64KB")
    try:
        bus = await NatsBus.connect(server.url)
        assert bus.max_payload == 64 * 1024
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handler(msg, headers, reply):
            got.set_result(msg)

        await bus.subscribe("ls.test.big", handler)
        big = np.random.rand(256, 1024).astype(np.float32)  # 1 MiB
        await bus.publish("ls.test.big", StageMessage("chunk", "s", 1, tensors={"x": big}))
        msg = await asyncio.wait_for(got, 10)
        np.testing.assert_array_equal(msg.tensors["x"], big)
        await bus.close()
    finally:
        server.stop()


async def test_request_reply_and_trace_context_cross_a_nats_hop(nats_server):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    configure_tracing("test", exporter=exporter)
    bus = await NatsBus.connect(nats_server)
    seen_trace: list[int] = []

    async def echo(msg, headers, reply):
        ctx = extract_context(headers)
        with tracer().start_as_current_span("server", context=ctx) as span:
            seen_trace.append(span.get_span_context().trace_id)
        await bus.respond(reply, StageMessage("reply", msg.session_id, msg.chunk_index,
                                              tensors={"y": msg.tensors["x"] * 2}))

    await bus.subscribe("ls.test.echo", echo, queue="echo")
    with tracer().start_as_current_span("client") as span:
        client_trace = span.get_span_context().trace_id
        reply = await bus.request("ls.test.echo", StageMessage("req", "s", 3, tensors={"x": np.ones(4, np.float32)}))
    np.testing.assert_array_equal(reply.tensors["y"], np.full(4, 2, np.float32))
    assert seen_trace == [client_trace]
    with pytest.raises(asyncio.TimeoutError):
        await bus.request("ls.test.nobody", StageMessage("req"), timeout=0.3)
    await bus.close()
