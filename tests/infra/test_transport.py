"""NATS transport against a real nats-server: codec, subjects, split payloads (push and pull),
request/reply, trace context across a hop, failure modes."""

from __future__ import annotations

import asyncio
import time

import ml_dtypes
import numpy as np
import pytest
import torch
from livestage.devstack import start_nats

from livestage.observability import extract_context, tracer, use_memory_exporter
from livestage.protos import stages_pb2 as spb
from livestage.transport import (
    NatsBus,
    NoRespondersError,
    Subjects,
    decode,
    encode,
    kind_of,
    safe_token,
    tensor,
    to_numpy,
    to_torch,
    wrap,
)
from livestage.transport.codec import check_codec, decode_framed, encode_framed, message_headers


@pytest.fixture(scope="module")
def small_nats(tmp_path_factory):
    """A server whose max_payload (64 KB) forces splitting of anything realistic."""
    server = start_nats(tmp_path_factory.mktemp("nats-small"), max_payload="64KB")
    yield server.url
    server.stop()


def _audio(x, **routing) -> spb.StageEnvelope:
    """A typed message carrying one tensor (any body with a Tensor field would do)."""
    return wrap(spb.UserAudio(sample_rate=16000, audio=tensor(x)), **routing)


# -- codec ---------------------------------------------------------------------------------

def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "f64": rng.standard_normal(5),
        "empty": np.zeros((0, 5), np.int64),
        "scalar": np.array(7, dtype=np.uint8),
        "bool": rng.random((4, 4)) > 0.5,
        "i16": np.arange(-6, 6, dtype=np.int16).reshape(2, 6),
        "u16": np.arange(10, dtype=np.uint16),
        "strided": np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],  # not contiguous
        "bigendian": np.arange(4, dtype=">f4"),
        "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
    }


def test_codec_roundtrip_of_several_dtypes_and_shapes():
    tensors = _tensors()
    for k, v in tensors.items():
        got = to_numpy(spb.Tensor.FromString(tensor(v).SerializeToString()), k)
        assert got.shape == v.shape, k
        expected_dtype = np.dtype(np.float32) if k == "bigendian" else v.dtype  # wire is little-endian
        assert got.dtype == expected_dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)


def test_envelope_roundtrip_keeps_routing_and_typed_fields():
    out = decode(encode(wrap(spb.RollbackStage(last_kept=3), "s1", 5, 2)))
    assert (kind_of(out), out.session_id, out.chunk_index, out.epoch) == ("rollback_stage", "s1", 5, 2)
    assert out.rollback_stage.last_kept == 3
    with pytest.raises(TypeError, match="not a stage message body"):
        wrap(spb.Tensor())


def test_codec_torch_tensors_including_bfloat16():
    src = {"bf16": torch.randn(3, 5, dtype=torch.bfloat16), "i64": torch.arange(6).reshape(2, 3),
           "f32": torch.randn(4, requires_grad=True)}
    for k, v in src.items():
        t = tensor(v)
        back = to_torch(t)
        assert back.dtype == v.dtype and torch.equal(back, v.detach()), k
    bf16 = tensor(src["bf16"])
    assert bf16.dtype == spb.DTYPE_BFLOAT16 and len(bf16.data) == 2 * 15  # 2 bytes a value on the wire
    as_numpy = to_numpy(bf16)
    assert as_numpy.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(as_numpy.astype(np.float32), src["bf16"].float().numpy())
    assert to_torch(bf16, dtype=torch.float32).dtype == torch.float32


def test_headers_carry_routing_facts_and_codec_version():
    headers = message_headers(_audio(np.ones((2, 2), np.float32), session_id="s9", chunk_index=4, epoch=1))
    assert headers["ls-kind"] == "user_audio" and headers["ls-session"] == "s9"
    assert headers["ls-chunk"] == "4" and headers["ls-epoch"] == "1"
    check_codec(headers)
    with pytest.raises(ValueError, match="codec"):
        check_codec({**headers, "ls-codec": "99"})


def test_codec_rejects_bad_input_with_value_errors():
    data = encode(_audio(np.arange(100, dtype=np.float32)))
    with pytest.raises(ValueError, match="malformed"):
        decode(data[:-3])
    with pytest.raises(ValueError):
        decode(b"\x00")
    with pytest.raises(ValueError, match="no body"):
        decode(b"")
    with pytest.raises(ValueError, match="unsupported dtype"):
        tensor(np.array(["s"], dtype=object))
    lying = spb.Tensor(dtype=spb.DTYPE_FLOAT32, shape=[100], data=b"\0" * 12)
    with pytest.raises(ValueError, match="audio: 12 bytes for shape"):
        to_numpy(lying, "audio")
    with pytest.raises(ValueError, match="negative"):
        to_numpy(spb.Tensor(dtype=spb.DTYPE_UINT8, shape=[-1], data=b""))
    # trailing bytes (Triton pads batched replies) are ignored by the framed form
    framed = encode_framed(_audio(np.arange(100, dtype=np.float32)))
    assert to_numpy(decode_framed(framed + b"\0" * 16).user_audio.audio).shape == (100,)
    with pytest.raises(ValueError, match="truncated"):
        decode_framed(framed[:-3])


# -- subjects ------------------------------------------------------------------------------

def test_subject_scheme():
    assert Subjects.stage_work("encoder") == "ls.encoder.work"
    assert Subjects.queue_group("encoder") == "encoder"
    assert Subjects.worker("generator", "gen-1") == "ls.generator.gen-1"
    assert Subjects.worker_play("decoder", "dec-1") == "ls.decoder.dec-1.play"
    assert Subjects.session_reports("abc") == "ls.session.abc.reports"
    assert Subjects.session_frames("abc") == "ls.session.abc.frames"
    assert Subjects.control("abc") == "ls.control.abc"
    assert Subjects.is_queue_subject("ls.encoder.work")
    assert not Subjects.is_queue_subject("ls.generator.gen-1")


def test_subjects_are_sanitised_without_collisions():
    unsafe = Subjects.worker("generator", "gen.1*>")
    assert unsafe.startswith("ls.generator.gen_1__-") and unsafe.count(".") == 2
    assert safe_token("a.b") != safe_token("a_b") != safe_token("a*b")
    assert safe_token("a.b") == safe_token("a.b")  # deterministic
    assert " " not in Subjects.session_frames("a b")
    assert len(safe_token("x" * 500)) <= 96
    with pytest.raises(ValueError):
        Subjects.worker("generator", "")
    with pytest.raises(ValueError, match="reserved"):
        Subjects.worker("generator", "work")  # would alias ls.generator.work
    with pytest.raises(ValueError, match="reserved"):
        Subjects.stage_work("session")


# -- over a real server --------------------------------------------------------------------

async def test_large_tensor_crosses_a_server_with_small_max_payload(small_nats):
    bus = await NatsBus.connect(small_nats)
    assert bus.max_payload == 64 * 1024
    got: asyncio.Queue = asyncio.Queue()

    async def handler(msg, headers, reply):
        await got.put((msg, headers))

    await bus.subscribe("ls.test.big", handler)
    big = np.random.default_rng(1).random((256, 1024), dtype=np.float32)  # 1 MiB
    small = np.arange(10, dtype=np.int32)
    await bus.publish("ls.test.big", wrap(spb.FrameChunk(frames=tensor(big), audio=tensor(small), speaking=True),
                                          "s", 1))
    await bus.publish("ls.test.big", _audio(small))  # unsplit, after it
    msg, headers = await asyncio.wait_for(got.get(), 10)
    np.testing.assert_array_equal(to_numpy(msg.frame_chunk.frames), big)
    np.testing.assert_array_equal(to_numpy(msg.frame_chunk.audio), small)
    assert (kind_of(msg), msg.session_id, msg.chunk_index, msg.frame_chunk.speaking) == ("frame_chunk", "s", 1, True)
    assert headers["ls-kind"] == "frame_chunk" and "ls-part" not in headers
    assert kind_of((await asyncio.wait_for(got.get(), 10))[0]) == "user_audio"  # order kept
    await bus.close()


async def test_split_messages_to_a_queue_group_reach_exactly_one_member_intact(small_nats):
    """Pushed parts would scatter across queue members; queue subjects are pulled instead."""
    sender = await NatsBus.connect(small_nats)
    members = [await NatsBus.connect(small_nats) for _ in range(2)]
    received: list[tuple[int, int, bool]] = []
    done = asyncio.Event()
    n = 6

    def make_handler(member: int):
        async def handler(msg, headers, reply):
            expected = np.full((300, 1000), msg.chunk_index, np.float32)  # 1.2 MB each
            received.append((member, msg.chunk_index,
                             bool(np.array_equal(to_numpy(msg.user_audio.audio), expected))))
            if len(received) == n:
                done.set()
        return handler

    subject = Subjects.stage_work("qtest")
    for i, m in enumerate(members):
        await m.subscribe(subject, make_handler(i), queue=Subjects.queue_group("qtest"))
        await m.flush()
    for k in range(n):
        await sender.publish(subject, _audio(np.full((300, 1000), k, np.float32), chunk_index=k))
    await asyncio.wait_for(done.wait(), 30)
    await asyncio.sleep(0.3)  # nothing extra may trickle in
    assert sorted(k for _, k, _ in received) == list(range(n))  # each exactly once
    assert all(ok for _, _, ok in received)
    await sender.close()
    for m in members:
        await m.close()


async def test_request_reply_with_split_request_and_reply(small_nats):
    server_bus = await NatsBus.connect(small_nats)
    client_bus = await NatsBus.connect(small_nats)

    async def double(msg, headers, reply):
        doubled = to_numpy(msg.user_audio.audio) * 2
        await server_bus.respond(reply, wrap(spb.SpeakAudio(audio=tensor(doubled)), msg.session_id,
                                             msg.chunk_index))

    await server_bus.subscribe(Subjects.stage_work("echo"), double, queue="echo")
    await server_bus.flush()
    x = np.random.default_rng(2).random(300_000).astype(np.float32)  # 1.2 MB both ways
    reply = await client_bus.request(Subjects.stage_work("echo"), _audio(x, session_id="s", chunk_index=3),
                                     timeout=10)
    assert kind_of(reply) == "speak_audio" and reply.chunk_index == 3
    np.testing.assert_array_equal(to_numpy(reply.speak_audio.audio), x * 2)
    torch_reply = await client_bus.request(Subjects.stage_work("echo"), _audio(torch.ones(3)))
    assert to_torch(torch_reply.speak_audio.audio).sum() == 6
    await server_bus.close()
    await client_bus.close()


async def test_trace_context_crosses_a_nats_hop(nats_server):
    exporter = use_memory_exporter()
    bus = await NatsBus.connect(nats_server)
    seen: list[tuple[int, int]] = []

    async def echo(msg, headers, reply):
        with tracer().start_as_current_span("server", context=extract_context(headers)) as span:
            ctx = span.get_span_context()
            seen.append((ctx.trace_id, span.parent.span_id if span.parent else 0))
        await bus.respond(reply, wrap(spb.SpeakAudio(audio=tensor(to_numpy(msg.user_audio.audio) * 2)),
                                      msg.session_id, msg.chunk_index))

    await bus.subscribe("ls.test.echo", echo, queue="echo")
    with tracer().start_as_current_span("client") as span:
        client = span.get_span_context()
        reply = await bus.request("ls.test.echo", _audio(np.ones(4, np.float32), session_id="s", chunk_index=3))
    np.testing.assert_array_equal(to_numpy(reply.speak_audio.audio), np.full(4, 2, np.float32))
    assert seen == [(client.trace_id, client.span_id)]  # same trace, server span is a child
    names = {s.name: s for s in exporter.get_finished_spans()}
    assert names["server"].context.trace_id == names["client"].context.trace_id
    await bus.close()


async def test_no_responders_fail_fast_and_silence_times_out(nats_server):
    bus = await NatsBus.connect(nats_server)
    t0 = time.monotonic()
    with pytest.raises(NoRespondersError):
        await bus.request("ls.test.nobody", wrap(spb.EngineStatsRequest()), timeout=5)
    assert time.monotonic() - t0 < 2  # not the 5 s timeout

    async def silent(msg, headers, reply):
        pass

    await bus.subscribe("ls.test.silent", silent)
    with pytest.raises(asyncio.TimeoutError):
        await bus.request("ls.test.silent", wrap(spb.EngineStatsRequest()), timeout=0.3)
    await bus.close()


async def test_a_failing_handler_does_not_kill_the_subscription(nats_server):
    bus = await NatsBus.connect(nats_server)
    seen: list[int] = []
    third = asyncio.Event()

    async def flaky(msg, headers, reply):
        seen.append(msg.chunk_index)
        if msg.chunk_index == 1:
            raise RuntimeError("boom")
        if msg.chunk_index == 2:
            third.set()

    await bus.subscribe("ls.test.flaky", flaky)
    await bus.nc.publish("ls.test.flaky", b"not a stage message")  # dropped, counted
    for k in range(3):
        await bus.publish("ls.test.flaky", wrap(spb.EngineStatsRequest(), chunk_index=k))
    await asyncio.wait_for(third.wait(), 5)
    assert seen == [0, 1, 2]
    await bus.close()
