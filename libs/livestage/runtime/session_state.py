"""The per-session state machine: warmup -> idle <-> listening <-> responding (-> ended).

States change only at chunk boundaries, from what the chunk that starts playing contains:
speak audio -> responding, otherwise user audio -> listening, otherwise idle. An interrupt forces
the next state to listening (or idle if the user is silent).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SessionState(str, enum.Enum):
    WARMUP = "warmup"
    IDLE = "idle"
    LISTENING = "listening"
    RESPONDING = "responding"
    ENDED = "ended"


_ALLOWED = {
    SessionState.WARMUP: {SessionState.IDLE, SessionState.LISTENING, SessionState.RESPONDING,
                          SessionState.ENDED},
    SessionState.IDLE: {SessionState.LISTENING, SessionState.RESPONDING, SessionState.ENDED},
    SessionState.LISTENING: {SessionState.IDLE, SessionState.RESPONDING, SessionState.ENDED},
    SessionState.RESPONDING: {SessionState.IDLE, SessionState.LISTENING, SessionState.ENDED},
    SessionState.ENDED: set(),
}


@dataclass(frozen=True)
class Transition:
    previous: SessionState
    current: SessionState
    chunk_index: int


class SessionStateMachine:
    """Tracks the session state; `on_chunk` is called when a chunk starts playing."""

    def __init__(self) -> None:
        self.state = SessionState.WARMUP

    def _move(self, target: SessionState, chunk_index: int) -> Transition | None:
        if target == self.state:
            return None
        if target not in _ALLOWED[self.state]:
            raise ValueError(f"illegal session transition {self.state.value} -> {target.value}")
        previous, self.state = self.state, target
        return Transition(previous, target, chunk_index)

    def on_chunk(self, chunk_index: int, speaking: bool, user_speaking: bool) -> Transition | None:
        if self.state == SessionState.ENDED:
            return None
        if speaking:
            target = SessionState.RESPONDING
        elif user_speaking:
            target = SessionState.LISTENING
        else:
            target = SessionState.IDLE
        return self._move(target, chunk_index)

    def on_interrupt(self, chunk_index: int) -> Transition | None:
        if self.state == SessionState.RESPONDING:
            return self._move(SessionState.LISTENING, chunk_index)
        return None

    def end(self, chunk_index: int) -> Transition | None:
        return self._move(SessionState.ENDED, chunk_index)
