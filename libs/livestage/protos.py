"""Generated protobuf/gRPC code for `protos/`, produced at first import (or `python -m
livestage.protos`), never edited by hand and never committed.

`protos/livestage/v1/*.proto` compile into `libs/livestage/v1/` (git-ignored), so the generated
modules' own imports (`from livestage.v1 import session_pb2`) resolve inside this package. They are
regenerated whenever the .proto sources change (a digest is stored beside them).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

_LIBS = Path(__file__).resolve().parent.parent
_PROTO_DIR = _LIBS.parent / "protos"
_OUT_PKG = _LIBS / "livestage" / "v1"
SOURCES = ("livestage/v1/session.proto", "livestage/v1/stages.proto")


def _digest() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        h.update((_PROTO_DIR / rel).read_bytes())
    return h.hexdigest()


def generate(force: bool = False) -> Path:
    """Runs grpc_tools.protoc unless the generated code matches the sources."""
    stamp = _OUT_PKG / ".digest"
    if not _PROTO_DIR.is_dir():
        if (_OUT_PKG / "session_pb2.py").is_file():
            return _OUT_PKG  # installed without sources: use what the build generated
        raise RuntimeError(f"proto sources not found at {_PROTO_DIR}")
    digest = _digest()
    if not force and stamp.is_file() and stamp.read_text() == digest:
        return _OUT_PKG
    from grpc_tools import protoc

    _OUT_PKG.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{_PROTO_DIR}", f"--python_out={_LIBS}", f"--pyi_out={_LIBS}",
            f"--grpc_python_out={_LIBS}", *[str(_PROTO_DIR / s) for s in SOURCES]]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(SOURCES))
    (_OUT_PKG / "__init__.py").write_text('"""Generated from protos/livestage/v1 (do not edit)."""\n')
    stamp.write_text(digest)
    return _OUT_PKG


generate()

from livestage.v1 import session_pb2, session_pb2_grpc, stages_pb2  # noqa: E402

__all__ = ["generate", "session_pb2", "session_pb2_grpc", "stages_pb2"]

if __name__ == "__main__":
    print(generate(force=True))
    sys.exit(0)
