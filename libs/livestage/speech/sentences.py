"""Streamed reply text in, speakable sentences out.

TTS quality needs whole sentences (prosody), latency needs them early: the first sentence goes to
the voice while the language model is still writing the second. A sentence ends at `.`, `!`, `?`
or `;` followed by whitespace; a long clause is cut at a comma (and a run-on without commas at a
space) so one rambling sentence cannot hold the voice back. Abbreviations ("Dr.", "e.g."),
initials ("J. Smith") and decimals ("3.5") do not end a sentence. A terminator at the very end of
the buffer waits for the next delta, since "3." may become "3.5".
"""

from __future__ import annotations

import re

__all__ = ["SentenceSplitter"]

_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "st", "prof", "e.g", "i.e", "etc", "vs", "jr", "sr",
                            "approx", "mt", "fig", "cf", "a.m", "p.m", "u.s"})


class SentenceSplitter:
    """`push(delta)` returns the sentences the delta completes; `flush()` the rest at the end."""

    def __init__(self, long_clause: int = 120, hard_limit: int = 240):
        self.long_clause = long_clause
        self.hard_limit = max(hard_limit, long_clause)
        self._buf = ""
        self._scanned = 0  # characters of _buf already checked for a boundary

    def push(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        start = 0
        # the last character cannot be judged until the next one arrives
        for i in range(self._scanned, len(self._buf) - 1):
            if i < start:
                continue
            if self._boundary(start, i):
                sentence = self._buf[start:i + 1].strip()
                if sentence:
                    out.append(sentence)
                start = i + 1
        self._buf = self._buf[start:]
        self._scanned = max(len(self._buf) - 1, 0)
        return out

    def flush(self) -> list[str]:
        rest, self._buf, self._scanned = self._buf.strip(), "", 0
        return [rest] if rest else []

    def _boundary(self, start: int, i: int) -> bool:
        ch, nxt = self._buf[i], self._buf[i + 1]
        length = i - start
        if ch in "!?;" and nxt.isspace():
            return True
        if ch == "." and nxt.isspace():
            word = self._buf[start:i].rsplit(None, 1)[-1].lower() if self._buf[start:i].strip() else ""
            word = word.lstrip("(\"'")
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                return False  # "Dr. Lee", "e.g. this", "J. Smith"
            return True
        if ch == "," and nxt.isspace() and length >= self.long_clause:
            return True
        return ch.isspace() and length >= self.hard_limit
