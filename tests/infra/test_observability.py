"""JSON logs with session context and trace ids, tracing over gRPC, Prometheus metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request

import grpc
import pytest
from livestage.devstack import free_port

from livestage.observability import (
    METRICS,
    bind_session,
    configure_logging,
    current_trace_id,
    extract_context,
    get_logger,
    grpc_client_interceptors,
    grpc_server_interceptors,
    inject_headers,
    render_metrics,
    start_metrics_server,
    tracer,
    use_memory_exporter,
)
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc


@pytest.fixture
def log_lines():
    buf = io.StringIO()
    use_memory_exporter()
    configure_logging("unit", "INFO", stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    configure_logging("pytest", "WARNING")


def test_logs_are_json_with_session_chunk_and_trace(log_lines):
    log = get_logger("t")
    with tracer().start_as_current_span("span") as span:
        with bind_session("sess-1", chunk=4):
            log.info("chunk_done", ms=12.5)
            with bind_session("sess-1", chunk=5):
                log.info("inner")
            log.info("outer_again")
        log.info("after")
        expected_trace = format(span.get_span_context().trace_id, "032x")
        assert current_trace_id() == expected_trace
    log.debug("filtered_out")
    log.info("no_span")
    recs = {r["event"]: r for r in log_lines()}
    rec = recs["chunk_done"]
    assert rec["session_id"] == "sess-1" and rec["chunk"] == 4 and rec["service"] == "unit"
    assert rec["level"] == "info" and rec["ms"] == 12.5 and "T" in rec["timestamp"]
    assert rec["trace_id"] == expected_trace and len(rec["span_id"]) == 16
    assert recs["inner"]["chunk"] == 5 and recs["outer_again"]["chunk"] == 4  # nesting restores
    assert "session_id" not in recs["after"] and recs["after"]["trace_id"] == expected_trace
    assert "trace_id" not in recs["no_span"] and "filtered_out" not in recs


async def test_session_binding_follows_tasks(log_lines):
    log = get_logger()

    async def work():
        await asyncio.sleep(0)
        log.info("in_task")

    with bind_session("s-task", chunk=9):
        task = asyncio.create_task(work())
    await task
    rec = next(r for r in log_lines() if r["event"] == "in_task")
    assert (rec["session_id"], rec["chunk"]) == ("s-task", 9)


def test_stdlib_logging_goes_through_the_same_json(log_lines):
    with bind_session("s-std"):
        logging.getLogger("grpc.some.lib").warning("library says %s", "hi")
    rec = next(r for r in log_lines() if r["event"] == "library says hi")
    assert rec["level"] == "warning" and rec["session_id"] == "s-std" and rec["logger"] == "grpc.some.lib"


def test_trace_context_headers_round_trip():
    use_memory_exporter()
    with tracer().start_as_current_span("a") as span:
        headers = inject_headers({"ls-kind": "chunk"})
    assert headers["ls-kind"] == "chunk" and headers["traceparent"].startswith("00-")
    ctx = extract_context({k.upper(): v for k, v in headers.items()})  # case-insensitive
    with tracer().start_as_current_span("b", context=ctx) as child:
        assert child.get_span_context().trace_id == span.get_span_context().trace_id
    assert inject_headers({}) == {}  # no span, no header


class _Sessions(session_pb2_grpc.SessionServiceServicer):
    def __init__(self):
        self.trace_ids: list[str | None] = []

    async def GetSession(self, request, context):
        self.trace_ids.append(current_trace_id())
        if request.session_id == "nope":
            await context.abort(grpc.StatusCode.NOT_FOUND, "session_id: unknown session 'nope'")
        return pb.Session(session_id=request.session_id, state=pb.SESSION_STATE_IDLE)

    async def PushUserAudio(self, request_iterator, context):
        n = 0
        sid = ""
        async for chunk in request_iterator:
            sid = sid or chunk.session_id
            n += len(chunk.pcm16) // 2
        return pb.PushAudioSummary(session_id=sid, samples_accepted=n, seconds_accepted=n / 16000)

    async def StreamEvents(self, request, context):
        yield pb.SessionEvent(session_id=request.session_id, state_changed=pb.StateChanged(
            previous=pb.SESSION_STATE_WARMUP, current=pb.SESSION_STATE_IDLE))
        yield pb.SessionEvent(session_id=request.session_id,
                              chunk_timing=pb.ChunkTiming(chunk_index=0, stage_ms={"generator": 12.0},
                                                          end_to_end_ms=40.0))


async def test_grpc_calls_are_traced_across_client_and_server():
    exporter = use_memory_exporter()
    server = grpc.aio.server(interceptors=grpc_server_interceptors())
    servicer = _Sessions()
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             interceptors=grpc_client_interceptors()) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            with tracer().start_as_current_span("backend") as span:
                got = await stub.GetSession(pb.SessionRef(session_id="s1"))
                root = format(span.get_span_context().trace_id, "032x")
            assert got.state == pb.SESSION_STATE_IDLE
            summary = await stub.PushUserAudio(iter([
                pb.AudioChunk(session_id="s1", pcm16=b"\0\0" * 8000, sample_rate=16000, channels=1),
                pb.AudioChunk(pcm16=b"\0\0" * 8000)]))
            assert summary.samples_accepted == 16000 and summary.seconds_accepted == 1.0
            events = [e async for e in stub.StreamEvents(pb.SessionRef(session_id="s1"))]
            assert [e.WhichOneof("event") for e in events] == ["state_changed", "chunk_timing"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetSession(pb.SessionRef(session_id="nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(None)
    assert servicer.trace_ids[0] == root  # the server handled the call inside the caller's trace
    spans = exporter.get_finished_spans()
    server_spans = [s for s in spans if s.kind.name == "SERVER" and s.name.endswith("GetSession")]
    assert any(format(s.context.trace_id, "032x") == root for s in server_spans)


def test_metrics_are_exposed():
    METRICS.stage_latency.labels(stage="generator").observe(0.42)
    METRICS.chunk_e2e_latency.observe(0.9)
    METRICS.time_to_first_chunk.observe(0.33)
    METRICS.fps_delivered.labels(session_id="m1").set(24.0)
    METRICS.lookahead_chunks.labels(session_id="m1").set(2)
    METRICS.sessions_per_worker.labels(stage="generator", worker_id="g1").set(3)
    METRICS.errors.labels(kind="test").inc()
    port = free_port()
    server = start_metrics_server(port, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
    for needle in ('livestage_stage_chunk_seconds_bucket{le="0.5",stage="generator"}',
                   "livestage_chunk_e2e_seconds_count", "livestage_time_to_first_chunk_seconds_sum",
                   'livestage_fps_delivered{session_id="m1"} 24.0',
                   'livestage_lookahead_chunks{session_id="m1"} 2.0',
                   'livestage_sessions_per_worker{stage="generator",worker_id="g1"} 3.0',
                   'livestage_errors_total{kind="test"}'):
        assert needle in text, needle
    METRICS.forget_session("m1")
    assert 'session_id="m1"' not in render_metrics().decode()
    assert start_metrics_server(0) is None
