"""Tenants and their API keys, read from the file `LIVESTAGE_TENANTS_FILE` names.

The file is YAML; only key digests are stored, never keys:

    tenants:
      - id: acme                       # [a-z0-9][a-z0-9-]{0,31}
        key_sha256: 3f5a...            # or a list of digests while a key is rotated
        max_sessions: 4                # live sessions at once (RESOURCE_EXHAUSTED beyond)
        max_session_seconds: 3600      # a session ends by itself after this long
        calls_per_second: 20           # optional token-bucket limits (defaults below)
        call_burst: 40
        audio_seconds_per_second: 8
        audio_burst_seconds: 240

`TenantDirectory` re-reads the file when it changes (its mtime, size or inode), so keys are rotated
by rewriting the file or the Kubernetes Secret it is mounted from, with no restart. A file that no
longer parses keeps the last good table in force and logs why.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KEY_PREFIX", "Tenant", "TenantDirectory", "TenantFileError", "hash_key", "is_well_formed_key",
           "key_id", "new_key", "parse_tenants", "tenant_entry"]

KEY_PREFIX = "lsk_"
_KEY = re.compile(r"^lsk_[A-Za-z0-9_-]{32,128}$")
_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class TenantFileError(ValueError):
    """The tenants file is missing or malformed (the message names the entry and field)."""


@dataclass(frozen=True)
class Tenant:
    """One customer: who owns sessions, and the limits on what its keys may do."""

    id: str
    key_sha256: tuple[str, ...]
    max_sessions: int = 4
    max_session_seconds: int = 3600
    calls_per_second: float = 20.0
    call_burst: int = 40
    audio_seconds_per_second: float = 0.0
    """0: twice `max_sessions` (every session may receive real-time audio in both directions)."""
    audio_burst_seconds: float = 0.0
    """0: 60 s per session (an external TTS pushing a reply faster than real time)."""

    @property
    def audio_rate(self) -> float:
        return self.audio_seconds_per_second or 2.0 * self.max_sessions

    @property
    def audio_burst(self) -> float:
        return self.audio_burst_seconds or 60.0 * self.max_sessions


def new_key() -> str:
    """A fresh API key (shown once; only its digest is stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    """A short, non-secret name of a key for logs and audit records."""
    return digest[:12]


def is_well_formed_key(key: str) -> bool:
    return bool(_KEY.match(key))


def tenant_entry(tenant_id: str, key: str, max_sessions: int = 4, max_session_seconds: int = 3600) -> dict:
    """The YAML entry (a dict) for a tenant with this key."""
    return {"id": tenant_id, "key_sha256": hash_key(key), "max_sessions": max_sessions,
            "max_session_seconds": max_session_seconds}


_INT_FIELDS = {"max_sessions": (1, 10_000), "max_session_seconds": (10, 7 * 86400), "call_burst": (1, 100_000)}
_FLOAT_FIELDS = {"calls_per_second": (0.01, 100_000.0), "audio_seconds_per_second": (0.0, 10_000.0),
                 "audio_burst_seconds": (0.0, 1_000_000.0)}


def _number(where: str, value: Any, lo: float, hi: float, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise TenantFileError(f"{where}: must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise TenantFileError(f"{where}: must be {lo:g}..{hi:g}, got {value!r}")
    return kind(value)


def parse_tenants(text: str, source: str = "tenants file") -> dict[str, Tenant]:
    """Parses and validates the YAML (see the module docstring); returns tenants by id."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TenantFileError(f"{source}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), list):
        raise TenantFileError(f"{source}: expected a mapping with a `tenants:` list")
    out: dict[str, Tenant] = {}
    digests: dict[str, str] = {}
    for i, entry in enumerate(doc["tenants"]):
        where = f"{source}: tenants[{i}]"
        if not isinstance(entry, dict):
            raise TenantFileError(f"{where}: expected a mapping")
        unknown = set(entry) - {"id", "key_sha256", *_INT_FIELDS, *_FLOAT_FIELDS}
        if unknown:
            raise TenantFileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        tid = entry.get("id")
        if not isinstance(tid, str) or not _TENANT_ID.match(tid):
            raise TenantFileError(f"{where}.id: must match {_TENANT_ID.pattern}, got {tid!r}")
        if tid in out:
            raise TenantFileError(f"{where}.id: duplicate tenant {tid!r}")
        raw = entry.get("key_sha256")
        keys = raw if isinstance(raw, list) else [raw]
        if not keys or not all(isinstance(k, str) and _DIGEST.match(k) for k in keys):
            raise TenantFileError(f"{where}.key_sha256: must be a 64-hex-digit SHA-256 (or a list of them)")
        for k in keys:
            if k in digests:
                raise TenantFileError(f"{where}.key_sha256: the same key is also tenant {digests[k]!r}'s")
            digests[k] = tid
        fields: dict[str, Any] = {}
        for name, (lo, hi) in _INT_FIELDS.items():
            if name in entry:
                fields[name] = _number(f"{where}.{name}", entry[name], lo, hi, int)
        for name, (lo, hi) in _FLOAT_FIELDS.items():
            if name in entry:
                fields[name] = _number(f"{where}.{name}", entry[name], lo, hi, float)
        out[tid] = Tenant(id=tid, key_sha256=tuple(keys), **fields)
    return out


class TenantDirectory:
    """The tenants of `path`, looked up by API key; re-read when the file changes.

    `lookup` stats the file at most every `check_interval_s`, so rotation takes effect within that
    (a second by default) without a stat per call.
    """

    def __init__(self, path: str | Path, check_interval_s: float = 1.0, on_reload_error=None):
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._on_reload_error = on_reload_error
        self._lock = threading.Lock()
        self._by_digest: dict[str, Tenant] = {}
        self._by_id: dict[str, Tenant] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.reloads = 0
        self._load(initial=True)

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, initial: bool = False) -> None:
        try:
            stamp = self._file_stamp()
            tenants = parse_tenants(self.path.read_text(), str(self.path))
        except (OSError, TenantFileError) as exc:
            if initial:
                raise TenantFileError(str(exc) if isinstance(exc, TenantFileError)
                                      else f"{self.path}: cannot read the tenants file ({exc.strerror})") from None
            if self._on_reload_error is not None:
                self._on_reload_error(str(exc))
            return
        self._by_id = tenants
        self._by_digest = {d: t for t in tenants.values() for d in t.key_sha256}
        self._stamp = stamp
        self.reloads += 0 if initial else 1

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_interval_s:
            return
        with self._lock:
            self._checked = now
            try:
                changed = self._file_stamp() != self._stamp
            except OSError:
                changed = True
            if changed:
                self._load()

    def lookup(self, key: str) -> Tenant | None:
        """The tenant whose key this is, or None."""
        return self.lookup_digest(hash_key(key))

    def lookup_digest(self, digest: str) -> Tenant | None:
        """The tenant holding the key with this SHA-256 digest, or None."""
        self._maybe_reload()
        return self._by_digest.get(digest)

    def get(self, tenant_id: str) -> Tenant | None:
        self._maybe_reload()
        return self._by_id.get(tenant_id)

    def __len__(self) -> int:
        return len(self._by_id)
