"""Shared fixtures: a real nats-server and a real redis-server on free loopback ports, one of each
per test session. `LIVESTAGE_TEST_NATS_URL` / `LIVESTAGE_TEST_REDIS_URL` point the suite at
servers that already run (CI service containers) instead.

Tests that need a server of their own (a small max_payload, a server to kill) call
`livestage.devstack.start_nats` / `start_redis` directly.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from livestage.devstack import start_nats, start_redis


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a nats-server (JetStream on, max_payload 8 MB) for the whole test session."""
    external = os.environ.get("LIVESTAGE_TEST_NATS_URL")
    if external:
        yield external
        return
    server = start_nats(tmp_path_factory.mktemp("nats"), max_payload="8MB")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a redis-server (no persistence) for the whole test session."""
    external = os.environ.get("LIVESTAGE_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()
