"""One local stack (real nats-server, redis-server and service processes) for the module."""

from __future__ import annotations

import pytest

from livestage.devstack.stack import LocalStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = LocalStack(tmp_path_factory.mktemp("stack"), preset="tiny", generators=2,
                   env={"LIVESTAGE_STAGE_TIMEOUT_S": "3", "LIVESTAGE_HEARTBEAT_TTL_S": "1.5",
                        "LIVESTAGE_HEARTBEAT_INTERVAL_S": "0.3",
                        "LIVESTAGE_START_TIMEOUT_S": "8"})
    s.start()
    yield s
    s.stop()
