"""Mappings between the runtime's session states and the public protobuf enum, in one place."""

from __future__ import annotations

from livestage.protos import session_pb2 as pb
from livestage.runtime.session_state import SessionState

STATE_TO_PB = {SessionState.WARMUP: pb.SESSION_STATE_WARMUP, SessionState.IDLE: pb.SESSION_STATE_IDLE,
               SessionState.LISTENING: pb.SESSION_STATE_LISTENING,
               SessionState.RESPONDING: pb.SESSION_STATE_RESPONDING, SessionState.ENDED: pb.SESSION_STATE_ENDED}
