"""Workers that attach to a whole session (dialogue, publisher): the NATS side they share.

A session is attached with an `AttachSession` request on `ls.<stage>.work` (queue group: one
worker takes it and answers `SessionAttached` with its worker id, or `StageError` naming the
field it refused); from then on the worker follows the session's own subjects, obeys `control`
(`Interrupt`, `EndSession`), and lets go of it on a `DetachSession` request on its worker subject.

A worker holding `capacity` sessions leaves the queue group, so NATS routes new sessions to
workers with room; it rejoins when one ends. Heartbeats come from the process runner
(`sessions_held`), poked with `beat_soon()` on every attach and detach so placement sees the
change at once.

Each attached session's tasks run in one `SessionTasks`: when one of them fails, the worker
reports a `worker_error` (`<stage>_failed`) on the session's reports subject and detaches the
session, so a dead writer or listener never leaves a session that looks attached but does
nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from livestage.observability import METRICS, bind_session
from livestage.protos import session_pb2 as pb
from livestage.protos import stages_pb2 as spb
from livestage.serving.process import ServiceProcess, SessionTasks
from livestage.transport import Envelope, NatsBus, Subjects, error_envelope, kind_of, wrap

S = TypeVar("S")
MAX_ERROR_CHARS = 500


class AttachError(ValueError):
    """An attach request the worker refuses; `field` names the offending field."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field


@dataclass
class _Held(Generic[S]):
    session: S
    tasks: SessionTasks
    control: Any  # the control subscription


class SessionAttachedWorker(Generic[S]):
    """Subclasses set `stage` and `attach_kind` (the `AttachSession.attach` oneof field they
    accept) and implement `open_session`, `close_session` and optionally `on_interrupt`."""

    stage = "attached"
    attach_kind = ""

    def __init__(self, proc: ServiceProcess):
        self.proc = proc
        self.settings = proc.settings
        self.log = proc.log
        self._held: dict[str, _Held[S]] = {}
        self._work_sub: Any = None
        self._worker_sub: Any = None
        self._background: set[asyncio.Task] = set()
        self._queue_lock = asyncio.Lock()  # two detaches at once must not join the group twice
        self._draining = False

    @property
    def bus(self) -> NatsBus:
        return self.proc.bus

    @property
    def sessions(self) -> dict[str, S]:
        """The sessions held now, by id."""
        return {sid: held.session for sid, held in self._held.items()}

    @property
    def worker_id(self) -> str:
        return self.proc.worker_id

    # -- to implement ------------------------------------------------------------------------
    async def open_session(self, session_id: str, body: Any,
                           tasks: SessionTasks) -> tuple[S, spb.SessionAttached]:
        """Starts holding a session from its attach body (`DialogueAttach`, `PublisherAttach`);
        long-running work goes into `tasks`. Returns the session and the reply (worker_id is
        filled in by the caller). Raises AttachError to refuse."""
        raise NotImplementedError

    async def close_session(self, session: S, last_chunk: int) -> spb.SessionDetached:
        """Lets go of a session (its tasks are closed right after, if still running)."""
        raise NotImplementedError

    async def on_interrupt(self, session: S, env: Envelope, interrupt: spb.Interrupt) -> None:
        """The session rolled back (`env.epoch` is its new epoch)."""

    # -- the process runner's side (ServiceWorker) -------------------------------------------
    async def start(self) -> None:
        await self._join_queue()
        self._worker_sub = await self.bus.subscribe(self.proc.subject, self._on_worker_msg)

    def sessions_held(self) -> int | None:
        return len(self._held)

    async def drain(self) -> None:
        """SIGTERM: stop taking sessions, then end the ones held (recordings are finalised)."""
        self._draining = True
        if self._work_sub is not None:
            sub, self._work_sub = self._work_sub, None
            await sub.unsubscribe()
        for session_id in list(self._held):
            await self.detach(session_id, -1, rejoin=False)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _in_background(self, coro: Any, name: str) -> None:
        """Runs `coro` in its own task. Needed for anything that unsubscribes the subscription
        whose handler asks for it: nats-py cancels that handler's task on unsubscribe, which
        would cut the work (and the UNSUB itself) short."""
        task = asyncio.create_task(coro, name=f"{self.stage}:{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the queue group ---------------------------------------------------------------------
    async def _join_queue(self) -> None:
        async with self._queue_lock:
            if self._work_sub is None and not self._draining and len(self._held) < self.settings.capacity:
                self._work_sub = await self.bus.subscribe(Subjects.stage_work(self.stage), self._on_attach,
                                                          queue=Subjects.queue_group(self.stage))

    def _leave_queue_if_full(self) -> None:
        """Called from the queue subscription's own handler, so the unsubscribe runs beside it;
        a request already queued locally may still be taken (capacity is exceeded by at most
        what was in flight, never refused)."""
        if self._work_sub is not None and len(self._held) >= self.settings.capacity:
            sub, self._work_sub = self._work_sub, None
            self._in_background(sub.unsubscribe(), "leave_queue")

    # -- attach / detach ---------------------------------------------------------------------
    async def _refuse(self, reply: str, env: Envelope, field: str, message: str) -> None:
        METRICS.errors.labels(kind=f"{self.stage}_attach").inc()
        await self.bus.respond(reply, error_envelope(message, field, like=env))

    async def _on_attach(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        sid = env.session_id
        with bind_session(sid):
            if kind_of(env) != "attach_session":
                await self._refuse(reply, env, "body", f"body: expected attach_session, got {kind_of(env)!r}")
                return
            which = env.attach_session.WhichOneof("attach") or ""
            if which != self.attach_kind:
                await self._refuse(reply, env, "attach",
                                   f"attach: the {self.stage} stage takes {self.attach_kind!r}, got {which!r}")
                return
            if not sid:
                await self._refuse(reply, env, "session_id", "session_id: required")
                return
            if sid in self._held:  # a retried request: the session is already here
                await self.bus.respond(reply, wrap(spb.SessionAttached(worker_id=self.worker_id), sid))
                return
            tasks = await SessionTasks.start(f"{self.stage}:{sid}",
                                             lambda exc: self._session_failed(sid, exc))
            try:
                session, attached = await self.open_session(sid, getattr(env.attach_session, which), tasks)
            except AttachError as exc:
                await tasks.close()
                await self._refuse(reply, env, exc.field, str(exc))
                return
            except Exception as exc:
                await tasks.close()
                self.log.exception("attach_failed", session_id=sid)
                await self._refuse(reply, env, "", f"{self.stage}: could not attach: {exc!r}"[:MAX_ERROR_CHARS])
                return
            control = await self.bus.subscribe(Subjects.control(sid), self._control_handler(sid))
            self._held[sid] = _Held(session, tasks, control)
            self.proc.beat_soon()
            self.log.info("session_attached", session_id=sid, stage=self.stage)
            attached.worker_id = self.worker_id
            await self.bus.respond(reply, wrap(attached, sid))
            self._leave_queue_if_full()

    async def _on_worker_msg(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        if kind_of(env) == "detach_session":
            detached = await self.detach(env.session_id, env.detach_session.last_chunk)
            await self.bus.respond(reply, wrap(detached, env.session_id, epoch=env.epoch))
        else:
            await self.bus.respond(reply, error_envelope(
                f"body: the {self.stage} worker takes detach_session, got {kind_of(env)!r}", "body", like=env))

    async def detach(self, session_id: str, last_chunk: int, *, rejoin: bool = True) -> spb.SessionDetached:
        """Lets go of a session (idempotent: an unknown session answers an empty reply)."""
        held = self._held.pop(session_id, None)
        detached = spb.SessionDetached()
        if held is None:
            return detached
        with bind_session(session_id):
            try:
                await held.control.unsubscribe()
            except Exception:  # connection closing: the server drops it anyway
                pass
            try:
                detached = await self.close_session(held.session, last_chunk)
            except Exception:
                self.log.exception("detach_failed", session_id=session_id)
            finally:
                await held.tasks.close()
            self.log.info("session_detached", session_id=session_id, stage=self.stage)
        self.proc.beat_soon()
        if rejoin:
            await self._join_queue()
        return detached

    async def _session_failed(self, session_id: str, exc: BaseException) -> None:
        """A task of the session raised: say so on the session's reports, then detach it (in
        its own task: the failure handler runs inside the task group `detach` closes)."""
        METRICS.errors.labels(kind=f"{self.stage}_session_failed").inc()
        self.log.error("session_task_failed", session_id=session_id, error=repr(exc), exc_info=exc)
        try:
            await self.bus.publish(Subjects.session_reports(session_id), wrap(pb.ErrorEvent(
                code=f"{self.stage}_failed",
                message=f"{self.stage} worker {self.worker_id}: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]),
                session_id))
        except Exception as report_exc:  # NATS gone: the detach below still frees the slot
            self.log.warning("failure_report_failed", session_id=session_id, error=repr(report_exc))
        self._in_background(self.detach(session_id, -1), f"{session_id}:detach")

    # -- control -----------------------------------------------------------------------------
    def _control_handler(self, session_id: str):
        async def on_control(env: Envelope, headers: dict[str, str], reply: str) -> None:
            held = self._held.get(session_id)
            if held is None:
                return
            with bind_session(session_id):
                kind = kind_of(env)
                if kind == "end_session":  # detach unsubscribes this very handler
                    self._in_background(self.detach(session_id, -1), f"{session_id}:end")
                elif kind == "interrupt":
                    await self.on_interrupt(held.session, env, env.interrupt)
                else:
                    self.log.warning("control_ignored", kind=kind)
        return on_control
