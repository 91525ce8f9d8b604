"""The Triton path: a real tritonserver (CPU build from nvidia-pytriton) serving the repository we
generate from our model code, compared with the in-process engines."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livestage.devstack.triton import python_search_path, start_triton
from livestage.media.samples import sample_character, sample_speech
from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.protos import stages_pb2 as spb
from livestage.serving.stages import wire
from livestage.serving.stages.backends import (LocalBackend, TritonBackend, chain_chunk, encode_references,
                                               open_engines)
from livestage.serving.stages.engines import make_engine
from livestage.serving.triton.repository import STAGES, build_repository
from livestage.transport import kind_of, to_numpy, wrap

PRESET = get_preset("tiny")
IDLE = 3.0


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    repo = build_repository(root / "repo", "tiny", allow_seeded=True, idle_timeout_s=IDLE,
                            sys_path=python_search_path(), torch_threads=1)
    server = start_triton(repo, root, models=STAGES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local():
    models = build_models("tiny", None, seed=0)
    return {s: LocalBackend(make_engine(s, models, IDLE)) for s in STAGES}


def remote(server) -> dict:
    return {s: TritonBackend(server.url, s) for s in STAGES}


def _references(backends) -> spb.ReferenceSet:
    img = sample_character((PRESET.height, PRESET.width))
    reply = encode_references(backends["encoder"], "x", [("global", img)])
    assert kind_of(reply) == "references_encoded", reply
    return reply.references_encoded.references


def _open(backends, sid: str, refs: spb.ReferenceSet, seed: int = 5) -> None:
    for stage, reply in open_engines(backends, sid, refs, seed=seed, lookahead=2).items():
        assert kind_of(reply) == "engine_opened", (stage, reply)


def _chunk(backends, sid: str, k: int, speech: np.ndarray) -> dict[str, np.ndarray]:
    n = PRESET.chunk.samples_per_chunk
    part = np.zeros(n, np.float32)  # chunk k's own second: the encoder keeps the windows
    seg = speech[k * n:(k + 1) * n]
    part[:len(seg)] = seg
    request = spb.ChunkRequest(speak=wire.audio_slice(k * n, part), listen=wire.audio_slice(k * n, np.zeros(n, np.float32)),
                               played_chunk=k)
    out = chain_chunk(backends, wrap(request, sid, k, 0))
    return {"coarse": to_numpy(out["generator"].chunk_computed.latents.latents).astype(np.float32),
            "clean": to_numpy(out["refiner"].chunk_computed.latents.latents).astype(np.float32),
            "frames": to_numpy(out["decoder"].chunk_computed.frames),
            "checkpoint": out["generator"].chunk_computed.checkpoint}


def _stats(backends, stage: str) -> int:
    return backends[stage].call(wrap(spb.EngineStatsRequest())).engine_stats.sessions


def _close(backends, stage: str, sid: str):
    return backends[stage].call(wrap(spb.CloseStage(), sid))


def test_triton_path_equals_in_process_path_for_the_same_seed(triton, local):
    tri = remote(triton)
    speech = sample_speech(4.0, 16000, 1)
    refs_local, refs_tri = _references(local), _references(tri)
    a_lat = wire.references_from_pb(refs_local)[0][1]
    b_lat = wire.references_from_pb(refs_tri)[0][1]
    assert np.allclose(a_lat.numpy(), b_lat.numpy(), atol=1e-5)
    _open(local, "same", refs_local)
    _open(tri, "same", refs_tri)
    for k in range(4):
        a, b = _chunk(local, "same", k, speech), _chunk(tri, "same", k, speech)
        assert np.allclose(a["coarse"], b["coarse"], atol=1e-4), k
        assert np.allclose(a["clean"], b["clean"], atol=1e-4), k
        assert np.abs(a["frames"].astype(int) - b["frames"].astype(int)).max() <= 1, k
    for backends in (local, tri):
        for stage in STAGES:
            assert kind_of(_close(backends, stage, "same")) == "stage_closed"


def test_interleaved_sessions_keep_separate_caches_and_close_frees_state(triton, local):
    tri = remote(triton)
    refs = _references(tri)
    speech = sample_speech(4.0, 16000, 2)
    before = _stats(tri, "generator")
    _open(tri, "s1", refs, seed=1)
    _open(tri, "s2", refs, seed=2)
    assert _stats(tri, "generator") == before + 2
    outs = {"s1": [], "s2": []}
    for k in range(3):
        for sid in ("s1", "s2"):  # interleaved chunk by chunk
            outs[sid].append(_chunk(tri, sid, k, speech)["clean"])
    # each session alone gives exactly what it gave interleaved: no cache mixing
    _open(local, "solo", _references(local), seed=2)
    solo = [_chunk(local, "solo", k, speech)["clean"] for k in range(3)]
    for k in range(3):
        assert np.allclose(outs["s2"][k], solo[k], atol=1e-4)
        assert not np.allclose(outs["s1"][k], outs["s2"][k], atol=1e-3)
    for stage in STAGES:
        _close(tri, stage, "s1")
    assert _stats(tri, "generator") == before + 1
    reply = tri["generator"].call(wrap(spb.EncodedChunk(), "s1", 3, 0))
    assert kind_of(reply) == "stage_error" and "unknown session" in reply.stage_error.message
    for stage in STAGES:
        _close(tri, stage, "s2")
        _close(local, stage, "solo")


def test_idle_timeout_frees_an_abandoned_session(triton):
    tri = remote(triton)
    refs = _references(tri)
    base = _stats(tri, "refiner")
    _open(tri, "abandoned", refs)
    assert _stats(tri, "refiner") == base + 1
    time.sleep(IDLE + 1.5)
    assert _stats(tri, "refiner") == base
    reply = tri["refiner"].call(wrap(spb.RollbackStage(last_kept=0), "abandoned"))
    assert kind_of(reply) == "stage_error" and "idle-expired" in reply.stage_error.message
