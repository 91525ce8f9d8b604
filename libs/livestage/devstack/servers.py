"""LiveStage service processes (`python -m services.<name>`) on loopback, stopped cleanly.

NATS and Redis servers are in `livestage.devstack.datastores`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path



def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None,
                  name: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen
    port: int = 0
    url: str = ""
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: what a crashed node looks like."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def start_service(name: str, env: dict[str, str], workdir: Path, wait_port: int | None = None,
                  tag: str = "") -> ManagedProcess:
    """Starts `python -m services.<name>` with LIVESTAGE_* settings in `env`."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}{('-' + tag) if tag else ''}.log"
    full_env = {**os.environ, **env}
    full_env.setdefault("LIVESTAGE_TORCH_THREADS", "1")
    repo = Path(__file__).resolve().parents[3]
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), full_env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full_env, cwd=str(repo),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    mp = ManagedProcess(name, proc, wait_port or 0, log_path=log)
    if wait_port:
        try:
            wait_for_port(wait_port, timeout=60, proc=proc, name=name)
        except Exception as exc:
            mp.stop()
            raise RuntimeError(f"{exc}\n--- {name} log ---\n{mp.log()[-3000:]}") from None
    return mp
