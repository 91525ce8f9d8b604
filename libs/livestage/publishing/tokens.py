"""LiveKit access tokens: the avatar participant's (publish) and viewers' (subscribe-only)."""

from __future__ import annotations

from datetime import timedelta

from livekit import api

from livestage.observability import get_logger

_log = get_logger("publishing")
MIN_SECRET_BYTES = 32


def _require(**values: str) -> None:
    for name, value in values.items():
        if not value or not str(value).strip():
            raise ValueError(f"{name}: required (empty)")


def _check_secret(api_secret: str) -> None:
    # LiveKit signs with HS256; a short secret works but is guessable. Dev keys are often short,
    # so this warns instead of refusing.
    if len(api_secret.encode()) < MIN_SECRET_BYTES:
        _log.warning("livekit_secret_short", bytes=len(api_secret.encode()), recommended=MIN_SECRET_BYTES)


def avatar_token(api_key: str, api_secret: str, room: str, identity: str = "livestage-avatar",
                 name: str = "", ttl_s: int = 6 * 3600, publish_on_behalf: str | None = None) -> str:
    """The avatar worker joins as an agent that publishes audio+video and talks RPC/data; with
    `publish_on_behalf` the agent's RoomIO treats its tracks as the agent's own output."""
    _require(api_key=api_key, api_secret=api_secret, room=room, identity=identity)
    _check_secret(api_secret)
    token = (api.AccessToken(api_key, api_secret).with_kind("agent").with_identity(identity)
             .with_name(name or identity).with_ttl(timedelta(seconds=ttl_s))
             .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True,
                                          can_subscribe=True, can_publish_data=True)))
    if publish_on_behalf:
        token = token.with_attributes({"lk.publish_on_behalf": publish_on_behalf})
    return token.to_jwt()


def viewer_token(api_key: str, api_secret: str, room: str, identity: str, name: str = "",
                 ttl_s: int = 3600) -> str:
    """An end user's token: join the room and subscribe, nothing else (no publishing, no data)."""
    _require(api_key=api_key, api_secret=api_secret, room=room, identity=identity)
    _check_secret(api_secret)
    return (api.AccessToken(api_key, api_secret).with_identity(identity).with_name(name or identity)
            .with_ttl(timedelta(seconds=ttl_s))
            .with_grants(api.VideoGrants(room_join=True, room=room, can_subscribe=True,
                                         can_publish=False, can_publish_data=False))).to_jwt()
