"""Credentials of one dev-stack run: made fresh every time the stack starts, never reused.

- a NATS password per service user (`livestage.security.nats_permissions.NATS_USERS`), plus
  `devtools`, a user that may read and publish everything, for the tests and benchmarks that
  watch the stack from outside (it exists only in the dev stack, never in the chart);
- a Redis ACL user `livestage` with a password (the default user is off);
- the tenants file: `LIVESTAGE_TENANTS_FILE` when the operator set it (then `LIVESTAGE_API_KEY`,
  if set, is the key the demo uses), otherwise one with a development tenant `dev` whose key is
  written to `<workdir>/dev-api-key` (mode 0600).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from livestage.security.nats_permissions import NATS_USERS, nats_authorization
from livestage.security.tenants import new_key, tenant_entry

DEV_TENANT = "dev"
DEVTOOLS_USER = "devtools"
REDIS_USER = "livestage"


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@dataclass
class StackCredentials:
    nats_passwords: dict[str, str]
    redis_password: str
    tenants_file: Path
    api_key: str
    """The key the stack's own clients (demo, tests) use; '' with an operator's file and no key."""
    api_key_file: Path | None
    tenant_keys: dict[str, str] = field(default_factory=dict)
    """Keys of the tenants this run created (`dev` and any extra ones), by tenant id."""

    @classmethod
    def generate(cls, workdir: Path, extra_tenants: list[dict] | None = None) -> "StackCredentials":
        """New passwords and, unless `LIVESTAGE_TENANTS_FILE` is set, a new tenants file.

        `extra_tenants` are entries (`id` plus limits) added next to `dev`, each with a new key
        (tests use them for a second tenant and for tight limits)."""
        nats = {user: secrets.token_urlsafe(24) for user in (*NATS_USERS, DEVTOOLS_USER)}
        redis_password = secrets.token_urlsafe(24)
        operator_file = os.environ.get("LIVESTAGE_TENANTS_FILE", "")
        if operator_file and not extra_tenants:
            return cls(nats, redis_password, Path(operator_file), os.environ.get("LIVESTAGE_API_KEY", ""), None)
        keys = {DEV_TENANT: new_key()}
        entries = [{**tenant_entry(DEV_TENANT, keys[DEV_TENANT], max_sessions=64), "calls_per_second": 1000,
                    "call_burst": 2000}]
        for extra in extra_tenants or []:
            keys[extra["id"]] = new_key()
            entries.append({**extra, "key_sha256": tenant_entry(extra["id"], keys[extra["id"]])["key_sha256"]})
        tenants = _write_private(workdir / "tenants.yaml", yaml.safe_dump({"tenants": entries}, sort_keys=False))
        key_file = _write_private(workdir / "dev-api-key", keys[DEV_TENANT] + "\n")
        return cls(nats, redis_password, tenants, keys[DEV_TENANT], key_file, keys)

    def nats_authorization(self) -> str:
        services = {u: p for u, p in self.nats_passwords.items() if u != DEVTOOLS_USER}
        return nats_authorization(services, superusers={DEVTOOLS_USER: self.nats_passwords[DEVTOOLS_USER]})
