"""Shared fixtures: a real nats-server and a real redis-server on free loopback ports."""

from __future__ import annotations

import pytest

from livestage.devstack import start_nats, start_redis


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    proc = start_nats(tmp_path_factory.mktemp("nats"))
    yield proc.url
    proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc.url
    proc.stop()
