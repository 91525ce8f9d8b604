"""Prompt and output hygiene for a small *base* language model playing a character.

Gemma-3-270M base has no chat template and no notion of turns: it continues text. So the
prompt is a persona paragraph and a scripted exchange in a `User:` / `Character:` transcript,
ending on `Character:`; generation stops at the next speaker label or a blank line. Such models
still ramble, loop on one sentence and start writing the user's lines, so `ReplyGuard` passes the
reply on sentence by sentence (TTS speaks whole sentences anyway, so this costs no latency there),
drops role labels and repeated sentences, and caps the length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FALLBACK_REPLY", "STOP_STRINGS", "ChatTurn", "ReplyGuard", "build_prompt"]

FALLBACK_REPLY = "Sorry, I did not quite catch that. Could you say it again?"
STOP_STRINGS = ["\nUser:", "User:", "\nCharacter:", "Character:", "\nVisitor:", "\n\n", "<end_of_turn>"]
_LABEL = re.compile(r"^\s*(?:character|assistant|ai|user|visitor|you|me)\s*:\s*", re.I)
_ANY_LABEL = re.compile(r"\b(?:user|character|visitor|assistant)\s*:", re.I)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_PERSONA_DEFAULT = "The character is a friendly, helpful person."


@dataclass
class ChatTurn:
    """One line of the conversation so far."""

    role: str
    """`user` or `assistant` (the character)."""
    text: str

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"role: must be 'user' or 'assistant', got {self.role!r}")


def _one_line(text: str) -> str:
    """Newlines would let user text forge a speaker turn in a plain-text transcript."""
    return " ".join(text.split())


def build_prompt(persona: str, history: list[ChatTurn]) -> str:
    """Persona + a scripted opening exchange + the conversation, ending on the character's turn."""
    lines = [_one_line(persona) or _PERSONA_DEFAULT,
             "Below, the character talks with a visitor, answering in one or two short, friendly "
             "sentences, always in the first person.", "",
             "User: Hi, can you hear me?",
             "Character: Yes, I can hear you well. What would you like to talk about?"]
    for turn in history:
        label = "User" if turn.role == "user" else "Character"
        lines.append(f"{label}: {_one_line(turn.text)}")
    lines.append("Character:")
    return "\n".join(lines)


class ReplyGuard:
    """Turns a raw token stream into what the character may say: whole sentences, no role labels,
    no repeated sentence, at most `max_sentences` / `max_chars`. `feed` returns the sentences a
    piece completes; `finish` the last unterminated one (kept only if nothing was said yet and it
    was not cut by the token limit, since a half sentence spoken aloud sounds broken)."""

    def __init__(self, max_sentences: int = 3, max_chars: int = 300):
        self.max_sentences = max_sentences
        self.max_chars = max_chars
        self.said: list[str] = []
        self.finished = False
        self._pending = ""
        self._seen: set[str] = set()

    @property
    def text(self) -> str:
        return " ".join(self.said)

    def feed(self, piece: str) -> list[str]:
        if self.finished:
            return []
        self._pending += piece
        lead = _LABEL.match(self._pending)
        label = _ANY_LABEL.search(self._pending, lead.end() if lead else 0)
        if label:  # the model started another speaker's line: what follows is not ours
            self._pending = self._pending[:label.start()]
            out = self._complete_sentences()
            self.finished = True
            return out
        return self._complete_sentences()

    def finish(self, cut_by_length: bool = False) -> list[str]:
        """The end of generation: flushes a final sentence that had no closing punctuation."""
        if self.finished:
            return []
        rest = _LABEL.sub("", self._pending).strip()
        self._pending = ""
        self.finished = True
        if not re.search(r"\w", rest) or (cut_by_length and (self.said or len(rest.split()) < 3)):
            return []
        return self._accept(rest if rest[-1] in ".!?" else rest + ".")

    def _complete_sentences(self) -> list[str]:
        out: list[str] = []
        while not self.finished:
            match = _SENTENCE_END.search(self._pending)
            if not match:
                break
            sentence = _LABEL.sub("", self._pending[:match.end()]).strip()
            self._pending = self._pending[match.end():]
            if sentence:
                out += self._accept(sentence)
        return out

    def _accept(self, sentence: str) -> list[str]:
        key = re.sub(r"\W+", " ", sentence.lower()).strip()
        if not key:
            return []
        if key in self._seen:  # a loop: the rest would be more of the same
            self.finished = True
            return []
        if len(self.text) + len(sentence) + 1 > self.max_chars:
            self.finished = True
            return []
        self._seen.add(key)
        self.said.append(sentence)
        if len(self.said) >= self.max_sentences:
            self.finished = True
        return [sentence if len(self.said) == 1 else " " + sentence]
