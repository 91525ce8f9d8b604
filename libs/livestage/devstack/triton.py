"""A real Triton server on loopback, from the `tritonserver` build that the nvidia-pytriton
package ships (it runs on CPU), serving a repository made by `livestage.serving.triton.repository`."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from livestage.devstack.datastores import free_port
from livestage.devstack.servers import ManagedProcess, wait_for_port


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise FileNotFoundError("tritonserver not found: pip install nvidia-pytriton") from exc
    return Path(pytriton.__file__).parent


def triton_env() -> dict[str, str]:
    """Environment the bundled tritonserver and its python backend stub need on this machine: the
    interpreter's libpython first (the stub must not pick up another Python's), then the CUDA
    runtime that the wheel vendors (no GPU is needed)."""
    root = _pytriton_root()
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent / "nvidia_pytriton.libs")]
    current = os.environ.get("LD_LIBRARY_PATH", "")
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in [*libs, current] if p),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def backend_directory(workdir: Path) -> Path:
    """A backends/ folder whose python backend uses the stub built for this Python version."""
    root = _pytriton_root() / "tritonserver"
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, target / f.name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(root / "python_backend_stubs" / version / "triton_python_backend_stub", target)
    return workdir / "backends"


def python_search_path() -> str:
    """What the generated models put on sys.path to import LiveStage and its dependencies (the
    folder holding the `livestage` package first: an editable install finds it by a hook that the
    python backend stub does not run)."""
    import livestage

    own = str(Path(livestage.__file__).resolve().parent.parent)
    rest = [p for p in sys.path if p and Path(p).is_dir() and p != own]
    return os.pathsep.join([own, *rest])


def start_triton(repository: Path, workdir: Path, models: tuple[str, ...] = (),
                 timeout: float = 180.0) -> ManagedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    argv = [str(binary), f"--model-repository={repository}",
            f"--backend-directory={backend_directory(workdir)}", f"--grpc-port={grpc_port}",
            f"--http-port={http_port}", f"--metrics-port={metrics_port}", "--exit-timeout-secs=5",
            "--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--allow-metrics=false",
            "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
            f"--backend-config=python,shm-region-prefix-name=livestage{grpc_port}_"]
    log = workdir / "tritonserver.log"
    import subprocess

    proc = subprocess.Popen(argv, env=triton_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    mp = ManagedProcess("tritonserver", proc, grpc_port, f"127.0.0.1:{grpc_port}", log,
                        extra={"http_port": http_port})
    try:
        wait_for_port(grpc_port, timeout=60, proc=proc, name="tritonserver")
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(mp.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited:\n{mp.log()[-3000:]}")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return mp
            except Exception:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"tritonserver models not ready within {timeout:.0f} s:\n{mp.log()[-3000:]}")
    except Exception:
        mp.stop()
        raise
