"""Redis-backed state: session records (with TTL), sticky placement, worker liveness, checkpoints.

Keys (all under `ls:`):
- `ls:session:<id>` hash: the session record (`SessionRecord.to_hash`); `ls:sessions` set of ids.
- `ls:session:<id>:refs` bytes: encoded reference latents (any worker can prefill from them).
- `ls:worker:<id>` JSON with TTL: a live worker's last heartbeat; `ls:workers:<stage>` sorted set
  of worker ids scored by free slots; `ls:worker:<id>:sessions` set of sessions placed on it.
- `ls:ckpt:<id>:<stage>` hash chunk_index -> encoded history entry (sinks + window only);
  `ls:ckpt:<id>` set of the stages that have one.

Every multi-step change is a Lua script, so it is atomic: a concurrent expiry can never
resurrect half a session (HSET/HINCRBY on an expired key would create a record with no TTL that
lives forever), and two session services placing at once cannot both take a worker's last slot.
The scripts touch keys they derive from their arguments, which is fine on the single Redis (or
primary/replica pair) we run; a Redis Cluster would need hash tags.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import redis.asyncio as aioredis

__all__ = ["COUNTERS", "CheckpointStore", "NoWorkerAvailable", "SessionNotFound", "SessionRecord",
           "SessionStore", "WorkerInfo", "WorkerRegistry", "connect_redis", "redis_from_settings"]


class SessionNotFound(KeyError):
    """No record for this session id (never created, ended and deleted, or expired)."""

    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r}"


class NoWorkerAvailable(LookupError):
    """No live worker of a stage has a free slot."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage

    def __str__(self) -> str:
        return f"no live {self.stage} worker with a free slot"


def connect_redis(url: str, *, username: str = "", password: str = "", tls_ca: str = "") -> aioredis.Redis:
    """A client returning bytes (checkpoints are binary), with a periodic connection check so a
    Redis restart costs one failed command rather than a hung one. `username`/`password` log in
    as an ACL user; `tls_ca` requires TLS verified against that CA."""
    kwargs: dict[str, Any] = {}
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if tls_ca:
        url = "rediss://" + url.split("://", 1)[1] if url.startswith("redis://") else url
        kwargs["ssl_ca_certs"] = tls_ca
    return aioredis.from_url(url, decode_responses=False, health_check_interval=30, **kwargs)


def redis_from_settings(settings: Any) -> aioredis.Redis:
    """`connect_redis` with a service's `LIVESTAGE_REDIS_*` settings."""
    return connect_redis(settings.redis_url, username=settings.redis_username,
                         password=settings.redis_password, tls_ca=settings.redis_tls_ca)


def _s(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _int(v: str | None, default: int = 0) -> int:
    try:
        return int(float(v)) if v else default
    except ValueError:
        return default


def _float(v: str | None, default: float = 0.0) -> float:
    try:
        return float(v) if v else default
    except ValueError:
        return default


COUNTERS = ("chunks_generated", "chunks_refined", "chunks_decoded", "chunks_published",
            "chunks_played")
_PLACEMENT = "placement:"


@dataclass
class SessionRecord(Mapping[str, str]):
    """A session as stored in Redis.

    Typed fields for what the system reads; `extra` keeps any other field a service stores
    (persona, voice, seed, weights, sink digest, ...). Read-only mapping access (`rec["state"]`,
    `rec.get("placement:generator")`) sees the stored hash form, for code that treats the record
    as the raw hash.
    """

    id: str
    state: str = "warmup"
    preset: str = ""
    livekit_room: str = ""
    character: dict[str, str] = field(default_factory=dict)
    """Summary of the character (e.g. persona, voice, reference counts), never the images."""
    placement: dict[str, str] = field(default_factory=dict)
    """Stateful stage -> worker id."""
    chunks_generated: int = 0
    chunks_refined: int = 0
    chunks_decoded: int = 0
    chunks_published: int = 0
    chunks_played: int = 0
    playback_seconds: float = 0.0
    """Playback position: seconds of video the viewer has been shown."""
    created_ms: int = 0
    updated_ms: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    _SCALARS = ("id", "state", "preset", "livekit_room", *COUNTERS, "playback_seconds",
                "created_ms", "updated_ms")

    def to_hash(self) -> dict[str, str]:
        """The Redis hash form (every value a string)."""
        out = {k: str(v) for k, v in self.extra.items()}
        for name in self._SCALARS:
            out[name] = str(getattr(self, name))
        if self.character:
            out["character"] = json.dumps(self.character, sort_keys=True)
        for stage, worker in self.placement.items():
            out[_PLACEMENT + stage] = worker
        return out

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> "SessionRecord":
        h = {_s(k): _s(v) for k, v in raw.items()}
        try:
            character = json.loads(h.pop("character", "") or "{}")
        except ValueError:
            character = {}
        rec = cls(
            id=h.pop("id", ""), state=h.pop("state", "warmup"), preset=h.pop("preset", ""),
            livekit_room=h.pop("livekit_room", ""),
            character={str(k): str(v) for k, v in character.items()} if isinstance(character, dict) else {},
            placement={k[len(_PLACEMENT):]: h.pop(k) for k in list(h) if k.startswith(_PLACEMENT)},
            playback_seconds=_float(h.pop("playback_seconds", "")),
            created_ms=_int(h.pop("created_ms", "")), updated_ms=_int(h.pop("updated_ms", "")),
        )
        for name in COUNTERS:
            setattr(rec, name, _int(h.pop(name, "")))
        rec.extra = h
        return rec

    # read-only Mapping over the hash form
    def __getitem__(self, key: str) -> str:
        return self.to_hash()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_hash())

    def __len__(self) -> int:
        return len(self.to_hash())

    __hash__ = None  # type: ignore[assignment]  # mutable


def _to_fields(values: Mapping[str, object]) -> dict[str, str]:
    """Keyword fields -> hash fields (dicts: placement expands, others become JSON)."""
    out: dict[str, str] = {}
    for k, v in values.items():
        if k == "placement" and isinstance(v, Mapping):
            out.update({_PLACEMENT + str(s): str(w) for s, w in v.items()})
        elif isinstance(v, Mapping):
            out[k] = json.dumps(dict(v), sort_keys=True)
        else:
            out[k] = str(v)
    return out


# KEYS[1] session hash, KEYS[2] refs key. ARGV[1] ttl ms, ARGV[2..] field/value pairs.
# Returns 0 if the session does not exist.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1] workers zset of the stage, KEYS[2] session hash. ARGV: stage, ttl ms, now ms,
# session id, excluded ids... Picks the live worker with the most free slots, takes one slot,
# records the placement. Returns the worker id, '' if none has a slot, or -1 if no session.
_PLACE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local excluded = {}
for i = 5, #ARGV do excluded[ARGV[i]] = true end
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #ids, 2 do
  local wid, free = ids[i], tonumber(ids[i + 1])
  if redis.call('EXISTS', 'ls:worker:' .. wid) == 0 then
    redis.call('ZREM', KEYS[1], wid)
  elseif free > 0 and not excluded[wid] then
    redis.call('ZINCRBY', KEYS[1], -1, wid)
    local f = 'placement:' .. ARGV[1]
    local cur = redis.call('HGET', KEYS[2], f) or ''
    if cur ~= '' and cur ~= wid then redis.call('SREM', 'ls:worker:' .. cur .. ':sessions', ARGV[4]) end
    redis.call('HSET', KEYS[2], f, wid, 'updated_ms', ARGV[3])
    local ws = 'ls:worker:' .. wid .. ':sessions'
    redis.call('SADD', ws, ARGV[4])
    redis.call('PEXPIRE', ws, ARGV[2])
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
    return wid
  end
end
return ''
"""

# KEYS[1] ckpt hash, KEYS[2] ckpt stage index set. ARGV: ttl ms, chunk, data, stage, keep...
# ('*' as the only keep entry keeps everything).
_CKPT_SAVE = """
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if ARGV[5] ~= '*' then
  local keep = {}
  keep[ARGV[2]] = true
  for i = 5, #ARGV do keep[ARGV[i]] = true end
  for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
    if not keep[k] then redis.call('HDEL', KEYS[1], k) end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('HLEN', KEYS[1])
"""


# KEYS[1] the tenant's live-session set. ARGV: max sessions, session id, claim ttl ms.
# Forgets members that ended or expired (a pending claim, `ls:claim:<id>`, counts as live: the
# record is written only once the references are encoded), then takes a slot if one is free.
_CLAIM_SESSION = """
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local st = redis.call('HGET', 'ls:session:' .. sid, 'state')
  if (not st and redis.call('EXISTS', 'ls:claim:' .. sid) == 0) or st == 'ended' then
    redis.call('SREM', KEYS[1], sid)
  end
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('SET', 'ls:claim:' .. ARGV[2], '1', 'PX', ARGV[3])
return 1
"""

# KEYS[1] ls:room:<room>. ARGV: session id, ttl ms. A room is free when nobody holds it, or its
# holder ended, expired and has no pending claim. Returns 1 when the room is now this session's.
_CLAIM_ROOM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local st = redis.call('HGET', 'ls:session:' .. holder, 'state')
  if (st and st ~= 'ended') or (not st and redis.call('EXISTS', 'ls:claim:' .. holder) == 1) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] tenant live set, KEYS[2] ls:room:<room> (or ''). ARGV: session id.
_RELEASE = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', 'ls:claim:' .. ARGV[1])
if KEYS[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""
ROOM_TTL_MS = 8 * 86400 * 1000
"""Longer than any session may last (`max_session_seconds` is at most 7 days)."""


class SessionStore:
    """Session records with a TTL refreshed on every write (a live session never expires; an
    abandoned one disappears by itself).

    Tenants: a record's `tenant` field says who owns it; `ls:tenant:<t>:sessions` indexes a
    tenant's records for listing, `ls:tenant:<t>:live` holds its live sessions (the
    `max_sessions` quota, counted here so that every session-API replica sees the same count), and
    `ls:room:<room>` which live session holds a LiveKit room.
    """

    def __init__(self, r: aioredis.Redis, ttl_s: int = 3600):
        self.r = r
        self.ttl_s = ttl_s
        self._update = r.register_script(_UPDATE)
        self._claim_session = r.register_script(_CLAIM_SESSION)
        self._claim_room = r.register_script(_CLAIM_ROOM)
        self._release = r.register_script(_RELEASE)

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)

    @staticmethod
    def key(session_id: str) -> str:
        return f"ls:session:{session_id}"

    @classmethod
    def refs_key(cls, session_id: str) -> str:
        return f"{cls.key(session_id)}:refs"

    async def create(self, session: str | SessionRecord,
                     fields: Mapping[str, object] | None = None) -> SessionRecord:
        """Stores a new record (a SessionRecord, or an id plus fields) and returns it as stored.

        Replaces any record with the same id: ids are fresh uuids, so a clash is a re-create.
        """
        rec = session if isinstance(session, SessionRecord) else SessionRecord.from_hash(
            {**_to_fields(fields or {}), "id": session})
        now = _now_ms()
        rec.created_ms = rec.created_ms or now
        rec.updated_ms = now
        if not rec.id:
            raise ValueError("a session record needs an id")
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.key(rec.id))
            p.hset(self.key(rec.id), mapping=rec.to_hash())
            p.pexpire(self.key(rec.id), self._ttl_ms)
            p.sadd("ls:sessions", rec.id)
            if rec.extra.get("tenant"):
                p.sadd(self.tenant_key(rec.extra["tenant"], "sessions"), rec.id)
            await p.execute()
        return rec

    @staticmethod
    def tenant_key(tenant: str, what: str) -> str:
        return f"ls:tenant:{tenant}:{what}"

    async def claim_session_slot(self, tenant: str, session_id: str, max_sessions: int,
                                 claim_ttl_s: float = 300.0) -> bool:
        """Takes one of the tenant's `max_sessions` live slots for a session about to be created."""
        return bool(await self._claim_session(keys=[self.tenant_key(tenant, "live")],
                                              args=[max_sessions, session_id, int(claim_ttl_s * 1000)]))

    async def claim_room(self, room: str, session_id: str) -> bool:
        """Makes `room` this session's; False while another live session holds it."""
        return bool(await self._claim_room(keys=[f"ls:room:{room}"], args=[session_id, ROOM_TTL_MS]))

    async def release(self, tenant: str, session_id: str, room: str = "") -> None:
        """Gives back the session's quota slot and its room (the session ended or never started)."""
        await self._release(keys=[self.tenant_key(tenant, "live"), f"ls:room:{room}" if room else ""],
                            args=[session_id])

    async def exists(self, session_id: str) -> bool:
        return bool(await self.r.exists(self.key(session_id)))

    async def get(self, session_id: str) -> SessionRecord:
        raw = await self.r.hgetall(self.key(session_id))
        if not raw:
            raise SessionNotFound(session_id)
        return SessionRecord.from_hash(raw)

    async def ttl(self, session_id: str) -> float:
        """Seconds until the record expires (SessionNotFound if it does not exist)."""
        ms = await self.r.pttl(self.key(session_id))
        if ms == -2:
            raise SessionNotFound(session_id)
        return ms / 1000 if ms >= 0 else float("inf")

    async def update(self, session_id: str, **fields: object) -> None:
        """Sets fields atomically and refreshes the TTL (of the record and its references).
        Placements are made by `WorkerRegistry.place` (atomic with the worker's slot)."""
        data = _to_fields(fields)
        data["updated_ms"] = str(_now_ms())
        flat = [x for kv in data.items() for x in kv]
        ok = await self._update(keys=[self.key(session_id), self.refs_key(session_id)],
                                args=[self._ttl_ms, *flat])
        if not ok:
            raise SessionNotFound(session_id)

    async def placement(self, session_id: str) -> dict[str, str]:
        return dict((await self.get(session_id)).placement)

    async def list(self, limit: int = 100, tenant: str | None = None) -> list[SessionRecord]:
        """Sessions with a record (live or recently ended), oldest first, all or one tenant's
        (expired ids are pruned from the index on the way)."""
        index = "ls:sessions" if tenant is None else self.tenant_key(tenant, "sessions")
        ids = sorted(_s(i) for i in await self.r.smembers(index))
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as p:
            for sid in ids:
                p.hgetall(self.key(sid))
            raws = await p.execute()
        out, gone = [], []
        for sid, raw in zip(ids, raws):
            if raw:
                out.append(SessionRecord.from_hash(raw))
            else:
                gone.append(sid)
        if gone:
            await self.r.srem(index, *gone)
        out.sort(key=lambda rec: (rec.created_ms, rec.id))
        return out[:limit]

    async def delete(self, session_id: str) -> bool:
        """Removes the record, its references and its placements; True if it existed."""
        raw = await self.r.hgetall(self.key(session_id))
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.key(session_id), self.refs_key(session_id))
            p.srem("ls:sessions", session_id)
            tenant = _s(raw.get(b"tenant"))  # the client returns bytes
            if tenant:
                p.srem(self.tenant_key(tenant, "sessions"), session_id)
            for k, v in raw.items():
                if _s(k).startswith(_PLACEMENT) and v:
                    p.srem(f"ls:worker:{_s(v)}:sessions", session_id)
            await p.execute()
        return bool(raw)

    async def save_references(self, session_id: str, data: bytes) -> None:
        await self.r.set(self.refs_key(session_id), data, px=self._ttl_ms)

    async def load_references(self, session_id: str) -> bytes:
        data = await self.r.get(self.refs_key(session_id))
        if data is None:
            raise SessionNotFound(session_id)
        return data


@dataclass
class WorkerInfo:
    worker_id: str
    stage: str
    capacity: int
    free: int
    subject: str = ""
    last_seen_ms: int = 0

    @classmethod
    def from_json(cls, raw: bytes | str, free: int | None = None) -> "WorkerInfo":
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        info = cls(**{k: v for k, v in data.items() if k in known})
        if free is not None:
            info.free = free
        return info


class WorkerRegistry:
    """Worker liveness and free capacity, for placing sessions on stateful stages.

    A worker is live while its heartbeat key exists (TTL `ttl_s`, refreshed by every beat).
    Free slots live in the `ls:workers:<stage>` sorted set: the worker's beat sets them, and
    `place` takes one at once so placements between beats do not overfill a worker.
    """

    def __init__(self, r: aioredis.Redis, ttl_s: float = 2.0, session_ttl_s: int = 3600):
        self.r = r
        self.ttl_s = ttl_s
        self.session_ttl_s = session_ttl_s
        self._place = r.register_script(_PLACE)

    @staticmethod
    def key(worker_id: str) -> str:
        return f"ls:worker:{worker_id}"

    @staticmethod
    def stage_key(stage: str) -> str:
        return f"ls:workers:{stage}"

    @staticmethod
    def sessions_key(worker_id: str) -> str:
        return f"ls:worker:{worker_id}:sessions"

    async def heartbeat(self, info: WorkerInfo | str, stage: str | None = None,
                        capacity: int | None = None, free: int | None = None,
                        subject: str = "") -> WorkerInfo:
        """Marks a worker live for `ttl_s` with its capacity and free slots.

        Call as `heartbeat(WorkerInfo(...))` or `heartbeat(worker_id, stage, capacity, free)`.
        """
        if not isinstance(info, WorkerInfo):
            if stage is None or capacity is None or free is None:
                raise TypeError("heartbeat(worker_id, stage, capacity, free) needs all four")
            info = WorkerInfo(info, stage, int(capacity), int(free), subject)
        info.last_seen_ms = _now_ms()
        async with self.r.pipeline(transaction=True) as p:
            p.set(self.key(info.worker_id), json.dumps(info.__dict__), px=max(int(self.ttl_s * 1000), 1))
            p.zadd(self.stage_key(info.stage), {info.worker_id: info.free})
            await p.execute()
        return info

    async def is_alive(self, worker_id: str) -> bool:
        return bool(await self.r.exists(self.key(worker_id)))

    async def get(self, worker_id: str) -> WorkerInfo | None:
        raw = await self.r.get(self.key(worker_id))
        if raw is None:
            return None
        info = WorkerInfo.from_json(raw)
        score = await self.r.zscore(self.stage_key(info.stage), worker_id)
        if score is not None:
            info.free = int(score)
        return info

    async def live_workers(self, stage: str) -> list[WorkerInfo]:
        """Live workers of `stage`, most free slots first (dead ones are pruned on the way)."""
        entries = await self.r.zrevrange(self.stage_key(stage), 0, -1, withscores=True)
        if not entries:
            return []
        raws = await self.r.mget([self.key(_s(w)) for w, _ in entries])
        out, dead = [], []
        for (wid, score), raw in zip(entries, raws):
            if raw is None:
                dead.append(_s(wid))
            else:
                out.append(WorkerInfo.from_json(raw, free=int(score)))
        if dead:
            await self.r.zrem(self.stage_key(stage), *dead)
        out.sort(key=lambda w: (-w.free, w.worker_id))
        return out

    async def place(self, session_id: str, stage: str, exclude: tuple[str, ...] = ()) -> str:
        """Places the session's `stage` on the freest live worker and records it (atomically).

        Returns the worker id; raises NoWorkerAvailable if no live worker has a free slot, and
        SessionNotFound if the session has no record.
        """
        result = await self._place(
            keys=[self.stage_key(stage), SessionStore.key(session_id)],
            args=[stage, int(self.session_ttl_s * 1000), _now_ms(), session_id, *exclude])
        if result == -1:
            raise SessionNotFound(session_id)
        worker = _s(result)
        if not worker:
            raise NoWorkerAvailable(stage)
        return worker

    async def sessions_on(self, worker_id: str) -> list[str]:
        return sorted(_s(s) for s in await self.r.smembers(self.sessions_key(worker_id)))

    async def deregister(self, worker_id: str, stage: str) -> None:
        """A worker leaving cleanly (drain): no new placements; its sessions stay recorded."""
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.key(worker_id))
            p.zrem(self.stage_key(stage), worker_id)
            await p.execute()



class CheckpointStore:
    """Per-session, per-stage latent checkpoints: the sink and window entries a new worker needs
    to rebuild a session's caches after a failover. Each save refreshes the TTL."""

    def __init__(self, r: aioredis.Redis, ttl_s: int = 3600):
        self.r = r
        self.ttl_s = ttl_s
        self._save = r.register_script(_CKPT_SAVE)

    @staticmethod
    def key(session_id: str, stage: str) -> str:
        return f"ls:ckpt:{session_id}:{stage}"

    @staticmethod
    def index_key(session_id: str) -> str:
        return f"ls:ckpt:{session_id}"

    async def save(self, session_id: str, stage: str, chunk_index: int, data: bytes,
                   keep: list[int] | None = None) -> int:
        """Stores chunk `chunk_index` and forgets entries whose index is not in `keep` (the sink
        and window chunks still needed); `keep=None` forgets nothing. Returns entries held."""
        keep_args = ["*"] if keep is None else [str(int(k)) for k in keep]
        return int(await self._save(
            keys=[self.key(session_id, stage), self.index_key(session_id)],
            args=[int(self.ttl_s * 1000), str(int(chunk_index)), data, stage, *keep_args]))

    async def load(self, session_id: str, stage: str) -> dict[int, bytes]:
        """chunk index -> entry bytes (empty if none)."""
        raw = await self.r.hgetall(self.key(session_id, stage))
        return {int(_s(k)): v for k, v in raw.items()}

    async def delete(self, session_id: str, stage: str | None = None) -> None:
        """Drops one stage's checkpoints, or every stage's."""
        if stage is not None:
            await self.r.delete(self.key(session_id, stage))
            await self.r.srem(self.index_key(session_id), stage)
            return
        stages = {_s(s) for s in await self.r.smembers(self.index_key(session_id))}
        stages |= {"generator", "refiner", "decoder"}
        await self.r.delete(self.index_key(session_id), *(self.key(session_id, s) for s in stages))
