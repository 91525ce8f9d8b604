"""Redis-backed state: sessions (with TTL), sticky placement, worker liveness, checkpoints.

Keys (all under `ls:`):
- `ls:session:<id>` hash: the session record; `ls:sessions` set of ids.
- `ls:session:<id>:refs` bytes: the encoded reference latents (any worker can prefill from them).
- `ls:worker:<id>` JSON with TTL: a live worker's heartbeat (stage, capacity, free slots);
  `ls:workers:<stage>` sorted set of worker ids by free slots.
- `ls:ckpt:<id>:<stage>` hash chunk_index -> encoded history entry (sinks + window only).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis


class SessionNotFound(KeyError):
    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r}"


def connect_redis(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, decode_responses=False)


def _s(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


class SessionStore:
    def __init__(self, r: aioredis.Redis, ttl_s: int = 3600):
        self.r = r
        self.ttl_s = ttl_s

    @staticmethod
    def key(session_id: str) -> str:
        return f"ls:session:{session_id}"

    async def create(self, session_id: str, fields: dict[str, object]) -> None:
        now = int(time.time() * 1000)
        data = {k: str(v) for k, v in fields.items()}
        data.setdefault("created_ms", str(now))
        data["updated_ms"] = str(now)
        data["id"] = session_id
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.key(session_id), mapping=data)
            p.expire(self.key(session_id), self.ttl_s)
            p.sadd("ls:sessions", session_id)
            await p.execute()

    async def exists(self, session_id: str) -> bool:
        return bool(await self.r.exists(self.key(session_id)))

    async def get(self, session_id: str) -> dict[str, str]:
        raw = await self.r.hgetall(self.key(session_id))
        if not raw:
            raise SessionNotFound(session_id)
        return {_s(k): _s(v) for k, v in raw.items()}

    async def update(self, session_id: str, **fields: object) -> None:
        if not await self.exists(session_id):
            raise SessionNotFound(session_id)
        data = {k: str(v) for k, v in fields.items()}
        data["updated_ms"] = str(int(time.time() * 1000))
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.key(session_id), mapping=data)
            p.expire(self.key(session_id), self.ttl_s)
            await p.execute()

    async def incr(self, session_id: str, field: str, amount: int = 1) -> int:
        return int(await self.r.hincrby(self.key(session_id), field, amount))

    async def set_placement(self, session_id: str, stage: str, worker_id: str,
                            expected: str | None = None) -> bool:
        """Compare-and-set of the worker holding `stage` for the session."""
        key = self.key(session_id)
        field = f"placement:{stage}"
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    await p.watch(key)
                    if not await p.exists(key):
                        raise SessionNotFound(session_id)
                    current = _s(await p.hget(key, field))
                    if expected is not None and current != expected:
                        await p.unwatch()
                        return False
                    p.multi()
                    p.hset(key, field, worker_id)
                    await p.execute()
                    return True
                except aioredis.WatchError:
                    continue

    async def placement(self, session_id: str) -> dict[str, str]:
        rec = await self.get(session_id)
        return {k.split(":", 1)[1]: v for k, v in rec.items() if k.startswith("placement:")}

    async def list(self, limit: int = 100) -> list[dict[str, str]]:
        ids = sorted(_s(i) for i in await self.r.smembers("ls:sessions"))
        out = []
        for sid in ids:
            try:
                out.append(await self.get(sid))
            except SessionNotFound:
                await self.r.srem("ls:sessions", sid)
            if len(out) >= limit:
                break
        return out

    async def delete(self, session_id: str) -> None:
        await self.r.delete(self.key(session_id), f"{self.key(session_id)}:refs")
        await self.r.srem("ls:sessions", session_id)

    async def save_references(self, session_id: str, data: bytes) -> None:
        await self.r.set(f"{self.key(session_id)}:refs", data, ex=self.ttl_s)

    async def load_references(self, session_id: str) -> bytes:
        data = await self.r.get(f"{self.key(session_id)}:refs")
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


class WorkerRegistry:
    def __init__(self, r: aioredis.Redis, ttl_s: float = 2.0):
        self.r = r
        self.ttl_s = ttl_s

    async def heartbeat(self, info: WorkerInfo) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.set(f"ls:worker:{info.worker_id}", json.dumps(info.__dict__), px=int(self.ttl_s * 1000))
            p.zadd(f"ls:workers:{info.stage}", {info.worker_id: info.free})
            await p.execute()

    async def is_alive(self, worker_id: str) -> bool:
        return bool(await self.r.exists(f"ls:worker:{worker_id}"))

    async def live_workers(self, stage: str) -> list[WorkerInfo]:
        ids = [_s(i) for i in await self.r.zrevrange(f"ls:workers:{stage}", 0, -1)]
        out = []
        for wid in ids:
            raw = await self.r.get(f"ls:worker:{wid}")
            if raw is None:
                await self.r.zrem(f"ls:workers:{stage}", wid)  # expired: forget it
                continue
            out.append(WorkerInfo(**json.loads(raw)))
        out.sort(key=lambda w: w.free, reverse=True)
        return out

    async def deregister(self, worker_id: str, stage: str) -> None:
        await self.r.delete(f"ls:worker:{worker_id}")
        await self.r.zrem(f"ls:workers:{stage}", worker_id)

    async def choose(self, stage: str, exclude: tuple[str, ...] = ()) -> WorkerInfo | None:
        """The live worker of `stage` with the most free slots (None if none has a free slot)."""
        for w in await self.live_workers(stage):
            if w.worker_id not in exclude and w.free > 0:
                return w
        return None


class CheckpointStore:
    def __init__(self, r: aioredis.Redis, ttl_s: int = 3600):
        self.r = r
        self.ttl_s = ttl_s

    @staticmethod
    def key(session_id: str, stage: str) -> str:
        return f"ls:ckpt:{session_id}:{stage}"

    async def save(self, session_id: str, stage: str, chunk_index: int, data: bytes,
                   keep: list[int]) -> None:
        """Stores chunk `chunk_index` and forgets entries whose index is not in `keep`."""
        key = self.key(session_id, stage)
        existing = [int(_s(k)) for k in await self.r.hkeys(key)]
        stale = [str(k) for k in existing if k not in keep and k != chunk_index]
        async with self.r.pipeline(transaction=True) as p:
            p.hset(key, str(chunk_index), data)
            if stale:
                p.hdel(key, *stale)
            p.expire(key, self.ttl_s)
            await p.execute()

    async def load(self, session_id: str, stage: str) -> dict[int, bytes]:
        raw = await self.r.hgetall(self.key(session_id, stage))
        return {int(_s(k)): v for k, v in raw.items()}

    async def delete(self, session_id: str) -> None:
        for stage in ("generator", "refiner", "decoder"):
            await self.r.delete(self.key(session_id, stage))
