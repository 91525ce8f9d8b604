"""NATS transport between stages: subjects in one place, tensors as raw bytes with a small
envelope, W3C trace context in headers, and messages split to fit the server's max_payload."""

from livestage.transport.codec import StageMessage, decode_message, encode_message
from livestage.transport.nats_bus import NatsBus
from livestage.transport.subjects import Subjects, safe_token

__all__ = ["NatsBus", "StageMessage", "Subjects", "decode_message", "encode_message", "safe_token"]
