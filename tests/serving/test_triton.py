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
from livestage.serving import wire
from livestage.serving.backends import LocalBackend, TritonBackend, chain_chunk
from livestage.serving.engines import make_engine
from livestage.serving.triton_repo import STAGES, build_repository
from livestage.transport import StageMessage

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
    return {s: TritonBackend(server.url, s, stateful=s != "encoder") for s in STAGES}


def _references(backends) -> bytes:
    img = sample_character((PRESET.height, PRESET.width)).numpy()
    reply = backends["encoder"].call(StageMessage("references", "x", meta={"kinds": "global"},
                                                  tensors={"image0": img}))
    assert reply.kind == "references", reply.meta
    return reply.tensors["encoded"].tobytes()


def _open(backends, sid: str, refs: bytes, seed: int = 5) -> None:
    for stage in ("generator", "refiner", "decoder"):
        reply = backends[stage].call(StageMessage("open", sid, meta={"seed": str(seed), "lookahead": "2"},
                                                  tensors={"references": np.frombuffer(refs, np.uint8)}))
        assert reply.kind == "opened", reply.meta


def _chunk(backends, sid: str, k: int, speech: np.ndarray) -> dict[str, np.ndarray]:
    n = PRESET.chunk.samples_per_chunk
    window = np.zeros(3 * n, np.float32)
    lo = (k - 2) * n
    for i in range(3 * n):
        if 0 <= lo + i < len(speech):
            window[i] = speech[lo + i]
    out = chain_chunk(backends, StageMessage("chunk", sid, k, 0, {}, {
        "speak_window": window, "listen_window": np.zeros_like(window)}))
    return {"coarse": out["generator"].tensors["coarse"], "clean": out["refiner"].tensors["clean"],
            "frames": out["decoder"].tensors["frames"], "checkpoint": out["generator"].tensors["checkpoint"]}


def _stats(backends, stage: str) -> int:
    return int(backends[stage].call(StageMessage("stats", "stats")).meta["sessions"])


def test_triton_path_equals_in_process_path_for_the_same_seed(triton, local):
    tri = remote(triton)
    speech = sample_speech(4.0, 16000, 1)
    refs_local, refs_tri = _references(local), _references(tri)
    a_lat = wire.decode_references(refs_local)[0][1]
    b_lat = wire.decode_references(refs_tri)[0][1]
    assert np.allclose(a_lat.numpy(), b_lat.numpy(), atol=1e-5)
    _open(local, "same", refs_local)
    _open(tri, "same", refs_tri)
    for k in range(4):
        a, b = _chunk(local, "same", k, speech), _chunk(tri, "same", k, speech)
        assert np.allclose(a["coarse"], b["coarse"], atol=1e-4), k
        assert np.allclose(a["clean"], b["clean"], atol=1e-4), k
        assert np.abs(a["frames"].astype(int) - b["frames"].astype(int)).max() <= 1, k
    for backends in (local, tri):
        for stage in ("generator", "refiner", "decoder"):
            assert backends[stage].call(StageMessage("close", "same")).kind == "closed"


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
    for stage in ("generator", "refiner", "decoder"):
        tri[stage].call(StageMessage("close", "s1"))
    assert _stats(tri, "generator") == before + 1
    reply = tri["generator"].call(StageMessage("chunk", "s1", 3, 0, {}, {}))
    assert reply.kind == "error" and "unknown session" in reply.meta["error"]
    for stage in ("generator", "refiner", "decoder"):
        tri[stage].call(StageMessage("close", "s2"))
        local[stage].call(StageMessage("close", "solo"))


def test_idle_timeout_frees_an_abandoned_session(triton):
    tri = remote(triton)
    refs = _references(tri)
    base = _stats(tri, "refiner")
    _open(tri, "abandoned", refs)
    assert _stats(tri, "refiner") == base + 1
    time.sleep(IDLE + 1.5)
    assert _stats(tri, "refiner") == base
    reply = tri["refiner"].call(StageMessage("rollback", "abandoned", meta={"last_kept": "0"}))
    assert reply.kind == "error" and "idle-expired" in reply.meta["error"]
