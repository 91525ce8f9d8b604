"""Starting real nats-server / redis-server / service processes on loopback, for the local
launcher (`make up`), the integration tests and the benchmarks."""

from livestage.devstack.datastores import (
    RunningServer,
    ServerBinaryMissing,
    ServerStartError,
    find_binary,
    free_port,
    start_nats,
    start_redis,
    write_nats_config,
)
from livestage.devstack.servers import ManagedProcess, start_service, wait_for_port

__all__ = ["ManagedProcess", "RunningServer", "ServerBinaryMissing", "ServerStartError",
           "find_binary", "free_port", "start_nats", "start_redis", "start_service",
           "wait_for_port", "write_nats_config"]
