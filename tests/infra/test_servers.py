"""The test-support servers themselves: readiness, config, clear errors, clean teardown."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis
import livestage.devstack.datastores as servers
from livestage.devstack import ServerBinaryMissing, ServerStartError, find_binary, start_nats, start_redis


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_nats_server_honours_max_payload_and_jetstream(tmp_path):
    with start_nats(tmp_path, max_payload="64KB") as server:
        assert server.url.startswith("nats://127.0.0.1:")
        nc = await nats.connect(server.url)
        assert nc.max_payload == 64 * 1024
        js = nc.jetstream()
        await js.add_stream(name="probe", subjects=["probe.>"])
        ack = await js.publish("probe.x", b"hi")
        assert ack.stream == "probe"
        await nc.close()
        port = server.port
    assert not server.alive() and not _listening(port)


async def test_redis_server_starts_clean_and_stops(tmp_path):
    server = start_redis(tmp_path)
    r = aioredis.from_url(server.url)
    assert await r.ping()
    assert await r.dbsize() == 0
    assert (await r.config_get("save"))["save"] == ""
    await r.aclose()
    server.stop()
    assert not server.alive() and not _listening(server.port)
    server.stop()  # idempotent


def test_two_servers_get_different_ports(tmp_path):
    with start_redis(tmp_path / "a") as a, start_redis(tmp_path / "b") as b:
        assert a.port != b.port and a.alive() and b.alive()


def test_missing_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NATS_SERVER_BIN", str(tmp_path / "no-such-nats-server"))
    with pytest.raises(ServerBinaryMissing, match="NATS_SERVER_BIN"):
        start_nats(tmp_path)
    monkeypatch.delenv("NATS_SERVER_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH ...
    monkeypatch.setattr(servers.Path, "is_file", lambda self: False)  # ... nor in bin/ or sbin/
    with pytest.raises(ServerBinaryMissing, match="apt-get install redis-server"):
        find_binary("redis-server")


def test_a_server_that_cannot_start_reports_its_log(tmp_path):
    with start_redis(tmp_path / "first") as first:
        with pytest.raises(ServerStartError, match="redis-server") as info:
            start_redis(tmp_path / "second", port=first.port, timeout=5)  # port taken
        assert "---" in str(info.value)  # log tail included


async def test_dev_nats_conf_is_valid_and_raises_max_payload_to_8mb(tmp_path):
    """deploy/nats.conf (compose, `make up`) as is, only its addresses and store moved to tmp."""
    import re
    import subprocess

    from livestage.devstack import free_port

    conf = Path(__file__).resolve().parents[2] / "deploy" / "nats.conf"
    binary = find_binary("nats-server")
    assert subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True).returncode == 0
    port = free_port()
    text = conf.read_text()
    assert re.search(r"^max_payload:\s*8MB", text, re.M)
    text = re.sub(r"^listen:.*$", f"listen: 127.0.0.1:{port}", text, flags=re.M)
    text = re.sub(r"^http:.*$", f"http: 127.0.0.1:{free_port()}", text, flags=re.M)
    text = re.sub(r"store_dir:\s*[^,}\s]+", f'store_dir: "{tmp_path / "js"}"', text)
    local = tmp_path / "nats.conf"
    local.write_text(text)
    with (tmp_path / "nats.log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(local)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if _listening(port) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "nats.log").read_text()
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
        assert nc.max_payload == 8 * 1024 * 1024
        await nc.close()
    finally:
        proc.terminate()
        proc.wait(5)
