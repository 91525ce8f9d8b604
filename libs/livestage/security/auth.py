"""Who is calling: the `authorization: Bearer <key>` metadata of a gRPC call -> its `Caller`.

Every refusal is an `AccessRefused` whose message names the header, so a client sees at once
what to fix; the key itself is never echoed or logged (only its short `key_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from livestage.security.rate_limit import TenantLimiter
from livestage.security.tenants import Tenant, TenantDirectory, hash_key, is_well_formed_key, key_id

__all__ = ["AUTH_HEADER", "AccessRefused", "Authenticator", "Caller"]

AUTH_HEADER = "authorization"


class AccessRefused(Exception):
    """A call refused before it does anything: `code` is `unauthenticated` or `resource_exhausted`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    key_id: str

    @property
    def tenant_id(self) -> str:
        return self.tenant.id


class Authenticator:
    """Checks keys against the tenants file and applies each tenant's call rate limit."""

    def __init__(self, directory: TenantDirectory, limiter: TenantLimiter | None = None):
        self.directory = directory
        self.limiter = limiter or TenantLimiter()

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller of a call with this metadata (raises `AccessRefused`)."""
        values = [v for k, v in (metadata or ()) if k.lower() == AUTH_HEADER]
        if not values:
            raise AccessRefused("unauthenticated", f"{AUTH_HEADER}: missing; send `{AUTH_HEADER}: Bearer <api key>`")
        if len(values) > 1:
            raise AccessRefused("unauthenticated", f"{AUTH_HEADER}: sent more than once")
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, key = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AccessRefused("unauthenticated", f"{AUTH_HEADER}: expected `Bearer <api key>`")
        key = key.strip()
        if not is_well_formed_key(key):
            raise AccessRefused("unauthenticated", f"{AUTH_HEADER}: malformed API key (expected lsk_...)")
        digest = hash_key(key)  # once per call: the lookup and the key id share it
        tenant = self.directory.lookup_digest(digest)
        if tenant is None:
            raise AccessRefused("unauthenticated", f"{AUTH_HEADER}: unknown API key")
        caller = Caller(tenant, key_id(digest))
        if not self.limiter.take_call(tenant):
            raise AccessRefused("resource_exhausted",
                                f"{AUTH_HEADER}: tenant {tenant.id!r} is over its rate limit of "
                                f"{tenant.calls_per_second:g} calls/s; retry later")
        return caller
