"""Workers that attach to a whole session (dialogue, publisher): the NATS side they share.

A session is attached with an `open` request on `ls.<stage>.work` (queue group: one worker takes
it and answers `opened` with its worker id); from then on the worker follows the session's own
subjects, obeys `control` (interrupt, end), and ends it on a `close` request on its worker
subject. A worker holding `capacity` sessions leaves the queue group, so NATS routes new sessions
to workers with room; it rejoins when one ends. Heartbeats go to the same Redis registry as the
model stages (placement, dashboards, HPA on `livestage_sessions_per_worker`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Generic, TypeVar

from livestage.observability import METRICS, bind_session
from livestage.serving.process import ServiceProcess
from livestage.state import WorkerInfo, WorkerRegistry
from livestage.transport import StageMessage, Subjects

S = TypeVar("S")


class AttachError(ValueError):
    """An `open` request the worker refuses (the message names the field)."""


class SessionAttachedWorker(Generic[S]):
    """Subclasses implement `open_session`, `close_session` and optionally `on_control`."""

    stage = "attached"

    def __init__(self, proc: ServiceProcess):
        self.proc = proc
        self.settings = proc.settings
        self.log = proc.log
        self.sessions: dict[str, S] = {}
        self._work_sub: Any = None
        self._control_subs: dict[str, Any] = {}
        self._heartbeat: asyncio.Task | None = None
        self.registry = WorkerRegistry(proc.redis, self.settings.heartbeat_ttl_s)

    @property
    def bus(self):
        return self.proc.bus

    @property
    def worker_id(self) -> str:
        return self.proc.worker_id

    # -- to implement ------------------------------------------------------------------------
    async def open_session(self, msg: StageMessage) -> tuple[S, dict[str, str]]:
        """Starts holding a session; returns it and extra meta for the `opened` reply."""
        raise NotImplementedError

    async def close_session(self, session: S, msg: StageMessage) -> dict[str, str]:
        """Ends a session; returns meta for the `closed` reply."""
        raise NotImplementedError

    async def on_control(self, session: S, msg: StageMessage) -> None:
        """Interrupts and other control messages of one session."""

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self._join_queue()
        await self.bus.subscribe(Subjects.worker(self.stage, self.worker_id), self._on_worker_msg)
        self._heartbeat = asyncio.create_task(self._beat())

    async def _join_queue(self) -> None:
        if self._work_sub is None and len(self.sessions) < self.settings.capacity:
            self._work_sub = await self.bus.subscribe(Subjects.stage_work(self.stage), self._on_open,
                                                      queue=Subjects.queue_group(self.stage))

    async def _leave_queue_if_full(self) -> None:
        if self._work_sub is not None and len(self.sessions) >= self.settings.capacity:
            sub, self._work_sub = self._work_sub, None
            await sub.unsubscribe()

    async def _beat(self) -> None:
        while True:
            free = max(self.settings.capacity - len(self.sessions), 0)
            try:
                await self.registry.heartbeat(WorkerInfo(
                    worker_id=self.worker_id, stage=self.stage, capacity=self.settings.capacity,
                    free=free, subject=Subjects.worker(self.stage, self.worker_id)))
            except Exception as exc:  # Redis restarting: keep serving, try again next beat
                self.log.warning("heartbeat_failed", error=repr(exc))
            METRICS.sessions_per_worker.labels(stage=self.stage, worker_id=self.worker_id).set(
                len(self.sessions))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def drain(self) -> None:
        """SIGTERM: stop taking sessions, then end the ones held (recordings are finalised)."""
        if self._work_sub is not None:
            await self._work_sub.unsubscribe()
            self._work_sub = None
        for session_id in list(self.sessions):
            await self._close(session_id, StageMessage("close", session_id))
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.registry.deregister(self.worker_id, self.stage)

    # -- message handling --------------------------------------------------------------------
    async def _on_open(self, msg: StageMessage, headers: dict, reply: str) -> None:
        sid = msg.session_id
        with bind_session(sid):
            if not sid:
                await self.bus.respond(reply, StageMessage("error", meta={"error": "session_id: required"}))
                return
            if sid in self.sessions:
                await self.bus.respond(reply, StageMessage("opened", sid, meta={"worker_id": self.worker_id}))
                return
            try:
                session, meta = await self.open_session(msg)
            except AttachError as exc:
                await self.bus.respond(reply, StageMessage("error", sid, meta={"error": str(exc)}))
                return
            except Exception as exc:
                self.log.exception("open_failed", session_id=sid)
                await self.bus.respond(reply, StageMessage("error", sid, meta={"error": repr(exc)}))
                return
            self.sessions[sid] = session
            self._control_subs[sid] = await self.bus.subscribe(Subjects.control(sid), self._on_control)
            await self._leave_queue_if_full()
            self.log.info("session_attached", session_id=sid, stage=self.stage)
            await self.bus.respond(reply, StageMessage("opened", sid, meta={"worker_id": self.worker_id, **meta}))

    async def _on_worker_msg(self, msg: StageMessage, headers: dict, reply: str) -> None:
        if msg.kind == "close":
            meta = await self._close(msg.session_id, msg)
            await self.bus.respond(reply, StageMessage("closed", msg.session_id, meta=meta))

    async def _close(self, session_id: str, msg: StageMessage) -> dict[str, str]:
        session = self.sessions.pop(session_id, None)
        sub = self._control_subs.pop(session_id, None)
        if sub is not None:
            await sub.unsubscribe()
        meta: dict[str, str] = {}
        if session is not None:
            with bind_session(session_id):
                try:
                    meta = await self.close_session(session, msg)
                except Exception:
                    self.log.exception("close_failed", session_id=session_id)
                self.log.info("session_detached", session_id=session_id, stage=self.stage)
        await self._join_queue()
        return meta

    async def _on_control(self, msg: StageMessage, headers: dict, reply: str) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            return
        with bind_session(msg.session_id):
            if msg.meta.get("action") == "end":
                await self._close(msg.session_id, msg)
            else:
                await self.on_control(session, msg)


def run_attached_service(service: str, settings_cls: type,
                         make_worker: Callable[[ServiceProcess, Any], "SessionAttachedWorker"],
                         load: Callable[[Any], Any] | None = None) -> None:
    """Entry point of an attached-worker service: settings, shared models loaded once in a thread
    (`load(settings)`), the worker started once NATS/Redis are up, sessions closed on SIGTERM."""
    from livestage.config import load_settings

    settings = load_settings(settings_cls, service=service)

    async def main() -> None:
        proc = ServiceProcess(settings, service)
        shared = await asyncio.to_thread(load, settings) if load is not None else None
        holder: dict[str, SessionAttachedWorker] = {}

        async def setup() -> None:
            holder["w"] = make_worker(proc, shared)
            await holder["w"].start()

        async def drain() -> None:
            if "w" in holder:
                await holder["w"].drain()

        await proc.run(setup, drain)

    asyncio.run(main())
