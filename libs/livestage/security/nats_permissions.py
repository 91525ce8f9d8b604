"""Who may publish and subscribe to what on NATS: one user per service, least privilege.

The table is the one source of truth: the dev stack renders it into nats.conf
(`nats_authorization`), and the chart's `nats.users` values carry the same lists (a test checks
they agree). Read with `livestage.transport.subjects`, it says:

- a stage publishes only its own results: the encoder to generator workers, the generator to
  refiners, the refiner to decoders, the decoder a session's deliveries and frames;
- only the session service drives stages (open, chunks, play, close) and sends control messages;
- viewers (the playground) only read frames; nothing outside the stack has a user at all.

Replies: every user answers requests it received (`allow_responses`; a split answer is several
messages), receives on its own inbox prefix `_I.<user>.` (so nobody reads another service's
replies), and may fetch split messages that were offered to it (`_I.*.*.blob`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from livestage.transport.subjects import inbox_prefix

__all__ = ["NATS_USERS", "NatsPermissions", "nats_authorization"]


@dataclass(frozen=True)
class NatsPermissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


_S = "ls.session.*."
NATS_USERS: dict[str, NatsPermissions] = {
    "encoder": NatsPermissions(publish=("ls.generator.*",), subscribe=("ls.encoder.*",)),
    "generator": NatsPermissions(publish=("ls.refiner.*",), subscribe=("ls.generator.*",)),
    "refiner": NatsPermissions(publish=("ls.decoder.*",), subscribe=("ls.refiner.*",)),
    "decoder": NatsPermissions(publish=(_S + "deliveries", _S + "frames"),
                               subscribe=("ls.decoder.*", "ls.decoder.*.play")),
    "dialogue": NatsPermissions(publish=(_S + "reports", _S + "speak_audio", "ls.tts.work"),
                                subscribe=("ls.dialogue.*", _S + "user_audio", _S + "user_text", "ls.control.*")),
    "tts": NatsPermissions(publish=(_S + "speak_audio",), subscribe=("ls.tts.*",)),
    "publisher": NatsPermissions(publish=(_S + "playback", _S + "speak_audio", _S + "commands", _S + "reports"),
                                 subscribe=("ls.publisher.*", _S + "frames", "ls.control.*")),
    "session": NatsPermissions(
        publish=("ls.encoder.*", "ls.generator.*", "ls.refiner.*", "ls.decoder.*", "ls.decoder.*.play",
                 "ls.dialogue.*", "ls.publisher.*", _S + "user_audio", _S + "user_text", "ls.control.*"),
        subscribe=(_S + "deliveries", _S + "reports", _S + "speak_audio", _S + "playback", _S + "commands")),
    "playground": NatsPermissions(publish=(), subscribe=(_S + "frames",)),
}
MAX_RESPONSES = 1_000_000
"""Messages a user may send to one request's reply subject (a split reply is several)."""


def nats_authorization(passwords: dict[str, str], superusers: dict[str, str] | None = None) -> str:
    """The `authorization { users = [...] }` block of nats.conf for these users' passwords.

    A password may be a `$VARIABLE` reference (the chart's nats.conf reads them from the
    environment, which comes from a Secret); anything else is written as a quoted string.
    `superusers` may publish and subscribe to everything (the dev stack's test observer only).
    """
    unknown = set(passwords) - set(NATS_USERS)
    if unknown:
        raise ValueError(f"no NATS permissions defined for {sorted(unknown)}")
    lines = ["authorization {", "  users = ["]
    for user, password in passwords.items():
        perms = NATS_USERS[user]
        pw = password if password.startswith("$") else json.dumps(password)
        publish = [*perms.publish, "_I.*.*.blob"]
        subscribe = [*perms.subscribe, f"{inbox_prefix(user)}.>"]
        lines.append(f"    {{user: {json.dumps(user)}, password: {pw}, permissions: {{"
                     f"publish: {{allow: {json.dumps(publish)}}}, subscribe: {{allow: {json.dumps(subscribe)}}}, "
                     f"allow_responses: {{max: {MAX_RESPONSES}}}}}}}")
    for user, password in (superusers or {}).items():
        lines.append(f'    {{user: {json.dumps(user)}, password: {json.dumps(password)}, '
                     f'permissions: {{publish: ">", subscribe: ">"}}}}')
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"
