"""Every NATS subject LiveStage uses, built in one place.

Scheme (tokens are sanitised ids, see `safe_token`):

| subject                                | who listens                                  |
|----------------------------------------|----------------------------------------------|
| `ls.<stage>.work`                      | every worker of a stage, queue group <stage>: references, attach, synthesize |
| `ls.<stage>.<worker_id>`               | one worker: open/close/rollback, chunks, detach |
| `ls.decoder.<worker_id>.play`          | one decoder: play chunk k now (not queued behind a decode) |
| `ls.session.<session_id>.frames`       | the frames of each played chunk, once (publisher, viewers) |
| `ls.session.<session_id>.deliveries`   | decoder -> session runtime: a chunk is decoded (no pixels) |
| `ls.session.<session_id>.user_text`    | user text turns for the dialogue stage       |
| `ls.session.<session_id>.user_audio`   | the user's voice (PCM) for the dialogue stage |
| `ls.session.<session_id>.reports`      | workers -> session: transcripts, turns, reply text, errors |
| `ls.session.<session_id>.speak_audio`  | the character's speech (TTS, A2A, LiveKit agent) |
| `ls.session.<session_id>.playback`     | the publisher's playback position            |
| `ls.session.<session_id>.commands`     | requests to the session (a LiveKit agent's interrupt) |
| `ls.control.<session_id>`              | session -> its workers: interrupt, end       |

`session` and `control` are therefore reserved as stage names, and `work` as a worker id, so no
two rows can ever produce the same subject.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["RESERVED_STAGES", "RESERVED_WORKER_IDS", "Subjects", "inbox_prefix", "safe_token"]

_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_TOKEN = 96
RESERVED_STAGES = frozenset({"session", "control"})
RESERVED_WORKER_IDS = frozenset({"work"})


def safe_token(value: str) -> str:
    """A subject token from an id: no dots, wildcards or whitespace, and no collisions.

    Ids made of [A-Za-z0-9_-] (uuids, `generator-1`) pass unchanged. Anything else has its unsafe
    characters replaced by '_' *and* a short digest of the original appended, so `a.b` and `a_b`
    (or `a*b`) never share a subject. Very long ids are shortened the same way.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"empty or non-string subject token: {value!r}")
    if _SAFE.match(value) and len(value) <= _MAX_TOKEN:
        return value
    digest = hashlib.blake2s(value.encode(), digest_size=4).hexdigest()
    return f"{_UNSAFE.sub('_', value)[:_MAX_TOKEN - 9]}-{digest}"


def inbox_prefix(user: str) -> str:
    """The reply-inbox prefix of a NATS user, `_I.<user>` (`_INBOX` without one): each service
    may subscribe only below its own prefix, so nobody reads another service's replies."""
    return f"_I.{safe_token(user)}" if user else "_INBOX"


def _stage(stage: str) -> str:
    token = safe_token(stage)
    if token in RESERVED_STAGES:
        raise ValueError(f"{stage!r} is reserved and cannot be a stage name")
    return token


def _worker(worker_id: str) -> str:
    token = safe_token(worker_id)
    if token in RESERVED_WORKER_IDS:
        raise ValueError(f"{worker_id!r} is reserved and cannot be a worker id")
    return token


class Subjects:
    PREFIX = "ls"

    @classmethod
    def stage_work(cls, stage: str) -> str:
        """Unplaced work for any worker of a stage (subscribe with `queue=queue_group(stage)`)."""
        return f"{cls.PREFIX}.{_stage(stage)}.work"

    @staticmethod
    def queue_group(stage: str) -> str:
        return _stage(stage)

    @classmethod
    def is_queue_subject(cls, subject: str) -> bool:
        """True for `ls.<stage>.work`: exactly one member of a queue group gets each message, which
        matters to how the transport splits oversized messages."""
        parts = subject.split(".")
        return len(parts) == 3 and parts[0] == cls.PREFIX and parts[2] == "work"

    @classmethod
    def worker(cls, stage: str, worker_id: str) -> str:
        """Sticky subject of one worker: placement, control and chunks of its sessions."""
        return f"{cls.PREFIX}.{_stage(stage)}.{_worker(worker_id)}"

    @classmethod
    def worker_play(cls, stage: str, worker_id: str) -> str:
        """A decoder's playback subject: a subscription of its own, so "play chunk k" is never
        queued behind the decode of chunk k+1."""
        return f"{cls.worker(stage, worker_id)}.play"

    @classmethod
    def session_frames(cls, session_id: str) -> str:
        """The frames and audio of each chunk as it starts playing, published once by the decoder
        (publisher, playground, any viewer)."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.frames"

    @classmethod
    def session_deliveries(cls, session_id: str) -> str:
        """Decoded chunks (flags and timings, no pixels) from the decoder to the session runtime."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.deliveries"

    @classmethod
    def session_user_text(cls, session_id: str) -> str:
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.user_text"

    @classmethod
    def session_user_audio(cls, session_id: str) -> str:
        """The user's voice, float32 16 kHz, in arrival order (session service -> dialogue)."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.user_audio"

    @classmethod
    def session_reports(cls, session_id: str) -> str:
        """What the session's workers report for its public event stream: the dialogue's
        transcripts, turns and reply text, and any worker's errors."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.reports"

    @classmethod
    def session_speak_audio(cls, session_id: str) -> str:
        """The character's speech, tagged with its reply turn (TTS/A2A/LiveKit agent -> session)."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.speak_audio"

    @classmethod
    def session_playback(cls, session_id: str) -> str:
        """Playback position reports (publisher -> session runtime, for the lookahead)."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.playback"

    @classmethod
    def session_commands(cls, session_id: str) -> str:
        """Requests to the session from its workers (a LiveKit agent's `lk.clear_buffer`)."""
        return f"{cls.PREFIX}.session.{safe_token(session_id)}.commands"

    @classmethod
    def control(cls, session_id: str) -> str:
        """Control messages of one session (interrupt, end) for every worker attached to it."""
        return f"{cls.PREFIX}.control.{safe_token(session_id)}"

