"""Generated protobuf/gRPC code for `protos/`, produced at first import (or `python -m
livestage.protos`), never edited by hand and never committed.

Usage: `from livestage.protos import session_pb2, session_pb2_grpc, stages_pb2`.

Where the code goes: `protos/livestage/v1/*.proto` compile into `libs/livestage/v1/` (git-ignored,
docker-ignored, and the directory the Dockerfile chowns). That location mirrors the proto package
`livestage.v1`, so the imports protoc writes into the generated files
(`from livestage.v1 import session_pb2`) resolve as they are, with no post-processing.

When it regenerates: whenever the digest of the .proto sources *and* of the grpcio-tools/protobuf
versions differs from the one stored beside the output (`.digest`). Including the versions
matters: protobuf 6 refuses generated code newer than its runtime, so a rebuilt venv must
regenerate. Generation is serialised with a file lock and each file is moved into place
atomically, because several service processes started together all import this module at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

_LIBS = Path(__file__).resolve().parent.parent
PROTO_DIR = _LIBS.parent / "protos"
OUT_DIR = _LIBS / "livestage" / "v1"
SOURCES: tuple[str, ...] = ("livestage/v1/session.proto", "livestage/v1/stages.proto")
_DIGEST_FILE = ".digest"


class ProtoGenerationError(RuntimeError):
    """protoc failed, or the generated code is stale/missing and cannot be (re)generated."""


def _tool_versions() -> str:
    parts = []
    for dist in ("grpcio-tools", "protobuf"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return ";".join(parts)


def source_digest() -> str:
    """Digest of every .proto source plus the codegen/runtime versions."""
    h = hashlib.sha256(_tool_versions().encode())
    for rel in SOURCES:
        h.update(rel.encode() + b"\0")
        h.update((PROTO_DIR / rel).read_bytes())
    return h.hexdigest()


def is_stale() -> bool:
    """True when the generated code is missing or was produced from other sources/versions."""
    stamp = OUT_DIR / _DIGEST_FILE
    return not stamp.is_file() or stamp.read_text().strip() != source_digest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent importers generate once and never half-read."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic renames still protect readers
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_protoc(tmp: Path) -> None:
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={tmp}",
            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *[str(PROTO_DIR / s) for s in SOURCES]]
    if protoc.main(args) != 0:
        raise ProtoGenerationError("protoc failed on " + ", ".join(SOURCES)
                                   + " (its error is printed above)")


def generate(force: bool = False) -> Path:
    """Runs grpc_tools.protoc into OUT_DIR unless the generated code is current; returns OUT_DIR."""
    if not PROTO_DIR.is_dir():
        if (OUT_DIR / "session_pb2.py").is_file():
            return OUT_DIR  # installed without the sources: use what the build generated
        raise ProtoGenerationError(f"proto sources not found at {PROTO_DIR} and no generated code "
                                   f"in {OUT_DIR}")
    if not force and not is_stale():
        return OUT_DIR
    try:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProtoGenerationError(f"generated protobuf code in {OUT_DIR} is stale and the "
                                   f"directory is not writable ({exc}); run "
                                   f"`python -m livestage.protos` at build time") from None
    with _locked(OUT_DIR / ".lock"):
        if not force and not is_stale():
            return OUT_DIR  # another process generated it while we waited for the lock
        digest = source_digest()
        # scratch space inside the (git-ignored) output dir: a killed run leaves no litter in libs/
        with tempfile.TemporaryDirectory(dir=OUT_DIR, prefix=".tmp-") as tmp_name:
            tmp = Path(tmp_name)
            _run_protoc(tmp)
            produced = tmp / "livestage" / "v1"
            (produced / "__init__.py").write_text(
                '"""Generated from protos/livestage/v1 by livestage.protos (do not edit)."""\n')
            for f in produced.iterdir():
                os.replace(f, OUT_DIR / f.name)  # same filesystem: atomic per file
        (OUT_DIR / _DIGEST_FILE).write_text(digest)  # last: only complete output is "current"
    return OUT_DIR


generate()

from livestage.v1 import session_pb2, session_pb2_grpc, stages_pb2, stages_pb2_grpc  # noqa: E402

__all__ = ["OUT_DIR", "PROTO_DIR", "ProtoGenerationError", "generate", "is_stale",
           "session_pb2", "session_pb2_grpc", "source_digest", "stages_pb2", "stages_pb2_grpc"]


def main() -> int:
    """`python -m livestage.protos`: regenerate unconditionally and print where to."""
    print(generate(force=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
