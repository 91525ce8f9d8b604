"""Client side of the session API for product backends, our tools and tests."""

from livestage.client.channel import bearer_key, session_channel

__all__ = ["bearer_key", "session_channel"]
