"""Contracts: generated code exists, is regenerated when a .proto changes, and round-trips."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import livestage.protos as protos
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc, stages_pb2
from livestage.transport import wrap


def test_generated_code_is_current_and_not_committed():
    assert not protos.is_stale()
    assert (protos.OUT_DIR / ".digest").read_text() == protos.source_digest()
    repo = protos.PROTO_DIR.parent
    tracked = subprocess.run(["git", "ls-files", str(protos.OUT_DIR.relative_to(repo))], cwd=repo,
                             capture_output=True, text=True).stdout
    assert tracked.strip() == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", str(protos.OUT_DIR / "session_pb2.py")],
                             cwd=repo)
    assert ignored.returncode == 0


def test_regenerates_when_a_proto_changes(tmp_path, monkeypatch):
    src = tmp_path / "protos"
    shutil.copytree(protos.PROTO_DIR, src)
    out = tmp_path / "libs" / "livestage" / "v1"
    monkeypatch.setattr(protos, "PROTO_DIR", src)
    monkeypatch.setattr(protos, "OUT_DIR", out)
    assert protos.is_stale()
    protos.generate()
    assert {"session_pb2.py", "session_pb2_grpc.py", "stages_pb2.py", "__init__.py"} <= {
        p.name for p in out.iterdir()}
    assert not protos.is_stale()
    first = (out / "stages_pb2.py").stat().st_mtime_ns
    protos.generate()  # current: untouched
    assert (out / "stages_pb2.py").stat().st_mtime_ns == first
    stages = src / "livestage" / "v1" / "stages.proto"
    stages.write_text(stages.read_text().replace("message StageTiming {",
                                                 "message StageTiming {\n  string probe_field = 99;"))
    assert protos.is_stale()
    protos.generate()
    assert "probe_field" in (out / "stages_pb2.pyi").read_text()
    assert not list(out.glob(".tmp-*"))  # scratch dirs cleaned up
    stages.write_text("syntax = \"proto3\";\nmessage Broken {")  # protoc error is a clear error
    with pytest.raises(protos.ProtoGenerationError, match="protoc failed"):
        protos.generate()


def test_module_entry_point_regenerates():
    result = subprocess.run([sys.executable, "-m", "livestage.protos"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == protos.OUT_DIR
    assert not protos.is_stale()


def test_session_messages_round_trip():
    req = pb.CreateSessionRequest(
        character=pb.Character(references=[
            pb.ReferenceImage(kind=pb.REFERENCE_KIND_GLOBAL, image=b"\x89PNG-global"),
            pb.ReferenceImage(kind=pb.REFERENCE_KIND_VIEW, image=b"view"),
            pb.ReferenceImage(kind=pb.REFERENCE_KIND_EXPRESSION, image=b"smile")],
            persona="a calm narrator", voice="voice-7"),
        livekit_room="room-42",
        options=pb.SessionOptions(preset="demo", seed=11, lookahead_chunks=2))
    back = pb.CreateSessionRequest.FromString(req.SerializeToString())
    assert back == req
    assert [r.kind for r in back.character.references] == [1, 2, 3]
    assert back.character.references[0].image == b"\x89PNG-global"
    assert (back.character.voice, back.livekit_room, back.options.lookahead_chunks) == ("voice-7", "room-42", 2)

    events = [
        pb.SessionEvent(session_id="s", state_changed=pb.StateChanged(previous=pb.SESSION_STATE_IDLE,
                                                                      current=pb.SESSION_STATE_LISTENING)),
        pb.SessionEvent(session_id="s", transcript=pb.Transcript(text="hello", final=True)),
        pb.SessionEvent(session_id="s", chunk_timing=pb.ChunkTiming(
            chunk_index=3, stage_ms={"encoder": 5.0, "generator": 700.0}, end_to_end_ms=1700.0)),
        pb.SessionEvent(session_id="s", chunk_ready=pb.ChunkReady(chunk_index=3, frames=24,
                                                                  shape=[24, 64, 64, 3])),
        pb.SessionEvent(session_id="s", error=pb.ErrorEvent(code="invalid", message="bad",
                                                            field="character.references")),
    ]
    kinds = [pb.SessionEvent.FromString(e.SerializeToString()).WhichOneof("event") for e in events]
    assert kinds == ["state_changed", "transcript", "chunk_timing", "chunk_ready", "error"]
    assert pb.SessionEvent.FromString(events[2].SerializeToString()).chunk_timing.stage_ms["generator"] == 700.0
    assert [pb.SessionState.Name(v) for v in pb.SessionState.values()][1:] == [
        "SESSION_STATE_WARMUP", "SESSION_STATE_IDLE", "SESSION_STATE_LISTENING",
        "SESSION_STATE_RESPONDING", "SESSION_STATE_ENDED"]
    audio = pb.AudioChunk(session_id="s", pcm16=b"\x01\x00" * 160, sample_rate=16000, channels=1)
    assert pb.AudioChunk.FromString(audio.SerializeToString()) == audio


def test_session_service_has_every_rpc():
    service = pb.DESCRIPTOR.services_by_name["SessionService"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "CreateSession": (False, False), "StartSession": (False, False),
        "PushUserAudio": (True, False), "PushSpeakAudio": (True, False),
        "SendText": (False, False), "SetDirective": (False, False), "Interrupt": (False, False),
        "EndSession": (False, False), "GetSession": (False, False), "ListSessions": (False, False), "CreateViewerToken": (False, False),
        "StreamEvents": (False, True)}
    assert hasattr(session_pb2_grpc, "SessionServiceStub")
    assert hasattr(session_pb2_grpc, "add_SessionServiceServicer_to_server")


def test_stage_messages_round_trip():
    latents = stages_pb2.Tensor(dtype=stages_pb2.DTYPE_BFLOAT16, shape=[16, 3, 8, 8], data=b"\0" * (2 * 16 * 3 * 8 * 8))
    timing = stages_pb2.StageTiming(stage="generator", worker_id="g1", compute_ms=700.0)
    route = stages_pb2.Route(encoder="e1", generator="g1", refiner="r1", decoder="d1")
    bodies = [
        stages_pb2.ChunkRequest(route=route, directive="smile", played_chunk=3,
                                speak=stages_pb2.AudioSlice(start_sample=48000)),
        stages_pb2.EncodedChunk(route=route, conditions=stages_pb2.ChunkConditions(speaking=True), timings=[timing]),
        stages_pb2.LatentChunk(route=route, latents=latents, speaking=True, timings=[timing]),
        stages_pb2.FrameChunk(frames=latents, state=pb.SESSION_STATE_RESPONDING, timings=[timing]),
        stages_pb2.Interrupt(last_kept=4, reply=2, reason="barge_in", origin="session"),
    ]
    for body in bodies:
        env = wrap(body, "s", 4, 1)
        again = stages_pb2.StageEnvelope.FromString(env.SerializeToString())
        assert again == env and again.WhichOneof("body") is not None
    assert bodies[2].latents.shape == [16, 3, 8, 8] and bodies[0].route.generator == "g1"
    # no string kinds or string maps are left on the wire
    for message in stages_pb2.DESCRIPTOR.message_types_by_name.values():
        for f in message.fields:
            assert not (f.message_type and f.message_type.GetOptions().map_entry), f"{message.name}.{f.name}"
            assert not (f.name in ("kind", "meta") and f.type == f.TYPE_STRING), f"{message.name}.{f.name}"
