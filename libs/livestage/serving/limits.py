"""Limits on what callers may send, in one place: the session API checks them before anything
happens (INVALID_ARGUMENT naming the field), and the workers behind it check them again for
messages that reach them over NATS directly."""

from __future__ import annotations

import re

MAX_PERSONA_CHARS = 4000
MAX_TEXT_CHARS = 4000
"""A user text turn (`SendText`)."""
MAX_DIRECTIVE_CHARS = 1000
MAX_VOICE_CHARS = 64
_VOICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def voice_problem(voice: str) -> str | None:
    """Why `voice` is not a voice id (None when it is, or is empty: the default voice). Voice ids
    name a speaker of the TTS voice or of an external endpoint; never a path."""
    if not voice:
        return None
    if len(voice) > MAX_VOICE_CHARS:
        return f"longer than {MAX_VOICE_CHARS} characters"
    if not _VOICE.match(voice) or ".." in voice:
        return "a voice id is letters, digits, '_', '-' and '.' (no path)"
    return None
