"""NATS transport between stages: subjects in one place, tensors as raw bytes with a small
envelope, W3C trace context in headers, and messages split to fit the server's max_payload."""

from livestage.transport.codec import (
    StageMessage,
    decode_message,
    decode_tensors,
    encode_message,
    encode_tensors,
)
from livestage.transport.nats_bus import Handler, NatsBus, NoRespondersError
from livestage.transport.subjects import Subjects, safe_token

__all__ = ["Handler", "NatsBus", "NoRespondersError", "StageMessage", "Subjects", "decode_message",
           "decode_tensors", "encode_message", "encode_tensors", "safe_token"]
