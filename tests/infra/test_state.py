"""Redis state against a real redis-server: session records, TTL, counters, placement CAS,
worker heartbeats and placement, checkpoints, SessionNotFound."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from livestage.state import (
    CheckpointStore,
    NoWorkerAvailable,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    WorkerInfo,
    WorkerRegistry,
    connect_redis,
)


@pytest.fixture
async def r(redis_server):
    client = connect_redis(redis_server)
    yield client
    await client.aclose()


def _sid() -> str:
    return uuid.uuid4().hex


async def test_session_crud_with_typed_records(r):
    store = SessionStore(r, ttl_s=60)
    sid = _sid()
    created = await store.create(SessionRecord(
        id=sid, state="warmup", preset="tiny", livekit_room="room-1",
        character={"persona": "pirate", "voice": "v1", "references": "3"},
        extra={"seed": "7"}))
    assert created.created_ms > 0
    rec = await store.get(sid)
    assert isinstance(rec, SessionRecord)
    assert (rec.id, rec.state, rec.preset, rec.livekit_room) == (sid, "warmup", "tiny", "room-1")
    assert rec.character == {"persona": "pirate", "voice": "v1", "references": "3"}
    assert rec.extra == {"seed": "7"} and rec.chunks_generated == 0 and rec.placement == {}
    assert rec["state"] == "warmup" and rec.get("seed") == "7"  # hash-style read access

    await store.update(sid, state="idle", playback_seconds=2.5, weights="seeded:0")
    rec = await store.get(sid)
    assert rec.state == "idle" and rec.playback_seconds == 2.5 and rec.extra["weights"] == "seeded:0"
    assert rec.updated_ms >= rec.created_ms

    # the id+fields form used by the session service
    other = _sid()
    await store.create(other, {"state": "warmup", "preset": "demo", "persona": "x"})
    assert (await store.get(other)).extra == {"persona": "x"}
    listed = [s.id for s in await store.list()]
    assert sid in listed and other in listed
    assert listed.index(sid) < listed.index(other)  # oldest first

    assert await store.delete(sid)
    assert not await store.delete(sid)
    with pytest.raises(SessionNotFound):
        await store.get(sid)
    assert sid not in [s.id for s in await store.list()]


async def test_unknown_session_raises_session_not_found_and_creates_nothing(r):
    store = SessionStore(r, ttl_s=60)
    missing = "missing-" + _sid()
    with pytest.raises(SessionNotFound, match="unknown session") as info:
        await store.get(missing)
    assert info.value.session_id == missing
    for call in (store.update(missing, state="x"), WorkerRegistry(r).place(missing, "generator"),
                 store.load_references(missing), store.ttl(missing)):
        with pytest.raises(SessionNotFound):
            await call
    # no ghost record without a TTL was left behind by HINCRBY/HSET on a missing key
    assert not await r.exists(store.key(missing))


async def test_ttl_is_set_refreshed_on_update_and_records_expire(r):
    store = SessionStore(r, ttl_s=2)
    sid = _sid()
    await store.create(sid, {"state": "idle"})
    await store.save_references(sid, b"refs")
    assert 0 < await store.ttl(sid) <= 2
    await asyncio.sleep(1.2)
    await store.update(sid, state="listening")  # refreshes record and references
    assert await store.ttl(sid) > 1.5
    assert await r.pttl(store.refs_key(sid)) > 1500
    await asyncio.sleep(1.2)
    assert (await store.get(sid)).state == "listening"  # would have expired without the refresh
    assert await store.load_references(sid) == b"refs"
    await asyncio.sleep(2.2)
    with pytest.raises(SessionNotFound):
        await store.get(sid)
    assert sid not in [s.id for s in await store.list()]


async def test_replacing_a_stage_moves_the_session_off_the_old_worker(r):
    store = SessionStore(r, ttl_s=60)
    reg = WorkerRegistry(r, ttl_s=30)
    stage = "gen-" + uuid.uuid4().hex[:6]
    await reg.heartbeat("gen-a", stage, 4, 4)
    await reg.heartbeat("gen-b", stage, 4, 2)
    sid = _sid()
    await store.create(sid, {"state": "warmup"})
    assert await reg.place(sid, stage) == "gen-a"
    await store.update(sid, placement={"refiner": "ref-a"})
    # failover: the old worker is excluded, the session moves to the survivor
    assert await reg.place(sid, stage, exclude=("gen-a",)) == "gen-b"
    assert await store.placement(sid) == {stage: "gen-b", "refiner": "ref-a"}
    assert sid not in await reg.sessions_on("gen-a")
    assert sid in await reg.sessions_on("gen-b")
    await reg.deregister("gen-b", stage)
    assert [w.worker_id for w in await reg.live_workers(stage)] == ["gen-a"]


async def test_worker_heartbeats_expire(r):
    reg = WorkerRegistry(r, ttl_s=0.6)
    stage = "gen-" + uuid.uuid4().hex[:6]
    await reg.heartbeat("w1", stage, 4, 1)
    await reg.heartbeat(WorkerInfo("w2", stage, 4, 3, subject="ls.x.w2"))
    assert [w.worker_id for w in await reg.live_workers(stage)] == ["w2", "w1"]  # freest first
    assert (await reg.get("w2")).subject == "ls.x.w2"
    await asyncio.sleep(0.8)
    await reg.heartbeat("w1", stage, 4, 1)  # w1 keeps beating, w2 went silent
    assert [w.worker_id for w in await reg.live_workers(stage)] == ["w1"]
    assert not await reg.is_alive("w2") and await reg.is_alive("w1")
    assert await reg.get("w2") is None


async def test_place_picks_the_freest_live_worker_and_takes_a_slot(r):
    store = SessionStore(r, ttl_s=60)
    reg = WorkerRegistry(r, ttl_s=5)
    stage = "gen-" + uuid.uuid4().hex[:6]
    await reg.heartbeat("busy", stage, 4, 1)
    await reg.heartbeat("idle", stage, 4, 2)
    await reg.heartbeat("dead", stage, 4, 4)
    await r.delete(reg.key("dead"))  # its heartbeat expired
    sids = [_sid() for _ in range(4)]
    for sid in sids:
        await store.create(sid, {"state": "warmup"})
    placed = [await reg.place(sid, stage) for sid in sids[:3]]
    # idle(2) -> idle(1) ... ties go to either; never the dead one; 3 slots existed in total
    assert sorted(placed) == ["busy", "idle", "idle"]
    assert placed[0] == "idle"
    assert (await store.placement(sids[0]))[stage] == "idle"
    assert sorted(await reg.sessions_on("idle")) == sorted(s for s, w in zip(sids, placed) if w == "idle")
    with pytest.raises(NoWorkerAvailable):
        await reg.place(sids[3], stage)
    with pytest.raises(SessionNotFound):
        await reg.place("missing-" + _sid(), stage)
    await reg.heartbeat("spare", stage, 4, 4)
    with pytest.raises(NoWorkerAvailable):
        await reg.place(sids[3], stage, exclude=("spare",))
    assert await reg.place(sids[3], stage) == "spare"


async def test_concurrent_placements_never_overfill_a_worker(r):
    store = SessionStore(r, ttl_s=60)
    reg = WorkerRegistry(r, ttl_s=5)
    stage = "ref-" + uuid.uuid4().hex[:6]
    await reg.heartbeat("only", stage, 3, 3)
    sids = [_sid() for _ in range(8)]
    for sid in sids:
        await store.create(sid, {})
    results = await asyncio.gather(*(reg.place(sid, stage) for sid in sids), return_exceptions=True)
    assert sum(1 for x in results if x == "only") == 3
    assert sum(1 for x in results if isinstance(x, NoWorkerAvailable)) == 5


async def test_checkpoints_keep_only_sinks_and_window_and_expire(r):
    ck = CheckpointStore(r, ttl_s=60)
    sid = _sid()
    for k in range(8):
        held = await ck.save(sid, "generator", k, f"latents-{k}".encode() + bytes(range(256)),
                             keep=[0, 1, 2, k - 1, k])
        assert held <= 5
    stored = await ck.load(sid, "generator")
    assert sorted(stored) == [0, 1, 2, 6, 7]
    assert stored[7] == b"latents-7" + bytes(range(256))  # binary-safe
    assert 0 < await r.pttl(ck.key(sid, "generator")) <= 60_000
    await ck.save(sid, "refiner", 0, b"r0")
    await ck.save(sid, "refiner", 1, b"r1")  # keep=None: keep everything
    assert sorted(await ck.load(sid, "refiner")) == [0, 1]
    await ck.delete(sid)
    assert await ck.load(sid, "generator") == {} and await ck.load(sid, "refiner") == {}

    short = CheckpointStore(r, ttl_s=1)
    await short.save(sid, "decoder", 0, b"x", keep=[0])
    await asyncio.sleep(1.3)
    assert await short.load(sid, "decoder") == {}
