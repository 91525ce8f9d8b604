"""Starting real nats-server / redis-server / service processes on loopback, for the local
launcher (`make up`), the integration tests and the benchmarks."""

from livestage.devstack.servers import (
    ManagedProcess,
    find_binary,
    free_port,
    start_nats,
    start_redis,
    start_service,
    wait_for_port,
)

__all__ = ["ManagedProcess", "find_binary", "free_port", "start_nats", "start_redis",
           "start_service", "wait_for_port"]
