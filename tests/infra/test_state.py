"""Redis state against a real redis-server: sessions, TTL, placement CAS, heartbeats, checkpoints."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from livestage.state import CheckpointStore, SessionNotFound, SessionStore, WorkerInfo, WorkerRegistry, connect_redis


async def test_session_records_counters_placement_and_ttl(redis_server):
    r = connect_redis(redis_server)
    store = SessionStore(r, ttl_s=60)
    sid = uuid.uuid4().hex
    await store.create(sid, {"state": "warmup", "preset": "tiny"})
    assert (await store.get(sid))["state"] == "warmup"
    assert 0 < await r.ttl(store.key(sid)) <= 60
    assert await store.incr(sid, "chunks_generated") == 1
    assert await store.incr(sid, "chunks_generated", 2) == 3
    assert await store.set_placement(sid, "generator", "gen-a")
    assert not await store.set_placement(sid, "generator", "gen-b", expected="gen-x")
    assert await store.set_placement(sid, "generator", "gen-b", expected="gen-a")
    assert (await store.placement(sid)) == {"generator": "gen-b"}
    await store.update(sid, state="idle")
    assert sid in [s["id"] for s in await store.list()]
    with pytest.raises(SessionNotFound, match="unknown session"):
        await store.get("nope")
    with pytest.raises(SessionNotFound):
        await store.update("nope", state="x")
    short = SessionStore(r, ttl_s=1)
    await short.create("short-" + sid, {"state": "idle"})
    await asyncio.sleep(1.3)
    with pytest.raises(SessionNotFound):
        await short.get("short-" + sid)
    await r.aclose()


async def test_workers_expire_and_placement_picks_the_freest(redis_server):
    r = connect_redis(redis_server)
    reg = WorkerRegistry(r, ttl_s=0.6)
    stage = "gen-" + uuid.uuid4().hex[:6]
    await reg.heartbeat(WorkerInfo("w1", stage, 4, 1))
    await reg.heartbeat(WorkerInfo("w2", stage, 4, 3))
    assert (await reg.choose(stage)).worker_id == "w2"
    assert (await reg.choose(stage, exclude=("w2",))).worker_id == "w1"
    await asyncio.sleep(0.8)
    await reg.heartbeat(WorkerInfo("w1", stage, 4, 1))
    assert [w.worker_id for w in await reg.live_workers(stage)] == ["w1"]
    assert not await reg.is_alive("w2")
    await reg.heartbeat(WorkerInfo("w1", stage, 4, 0))
    assert await reg.choose(stage) is None  # no free slot anywhere
    await r.aclose()


async def test_checkpoints_keep_only_sinks_and_window(redis_server):
    r = connect_redis(redis_server)
    ck = CheckpointStore(r, ttl_s=60)
    sid = uuid.uuid4().hex
    for k in range(8):
        keep = [0, 1, 2, k - 1, k]
        await ck.save(sid, "generator", k, json.dumps({"k": k}).encode(), keep)
    stored = await ck.load(sid, "generator")
    assert sorted(stored) == [0, 1, 2, 6, 7]
    assert json.loads(stored[7]) == {"k": 7}
    await r.aclose()
