"""NATS transport between services: subjects in one place, typed protobuf envelopes with tensors
as raw bytes, W3C trace context in headers, and messages split to fit the server's max_payload."""

from livestage.transport.codec import (
    Envelope,
    build,
    decode,
    encode,
    error_envelope,
    kind_of,
    tensor,
    to_numpy,
    to_torch,
    wrap,
)
from livestage.transport.nats_bus import Handler, NatsBus, NoRespondersError
from livestage.transport.subjects import Subjects, safe_token

__all__ = ["Envelope", "Handler", "NatsBus", "NoRespondersError", "Subjects", "build", "decode",
           "encode", "error_envelope", "kind_of", "safe_token", "tensor", "to_numpy", "to_torch",
           "wrap"]
