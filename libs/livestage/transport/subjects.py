"""Every NATS subject LiveStage uses, built in one place."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_token(value: str) -> str:
    """A subject token from an id: anything but [A-Za-z0-9_-] becomes '_' (no wildcards, no dots)."""
    if not value:
        raise ValueError("empty subject token")
    return _UNSAFE.sub("_", value)


class Subjects:
    PREFIX = "ls"

    @classmethod
    def stage_work(cls, stage: str) -> str:
        """Unplaced work for any worker of a stateless stage (queue group = stage)."""
        return f"{cls.PREFIX}.{safe_token(stage)}.work"

    @classmethod
    def worker(cls, stage: str, worker_id: str) -> str:
        """Sticky subject of one worker: chunks and control messages of its sessions."""
        return f"{cls.PREFIX}.{safe_token(stage)}.{safe_token(worker_id)}"

    @classmethod
    def session_frames(cls, session_id: str) -> str:
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.frames"

    @classmethod
    def session_events(cls, session_id: str) -> str:
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.events"

    @classmethod
    def session_deliveries(cls, session_id: str) -> str:
        """Finished chunks (frames + timings) from the decoder back to the session runtime."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.deliveries"
