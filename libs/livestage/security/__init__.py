"""Tenants, API keys, rate limits, the NATS permission table and TLS material: what makes the
session API safe to put on a network (see docs/security.md)."""

from livestage.security.auth import AUTH_HEADER, AccessRefused, Authenticator, Caller
from livestage.security.rate_limit import TenantLimiter, TokenBucket
from livestage.security.tenants import (Tenant, TenantDirectory, TenantFileError, hash_key, new_key,
                                        parse_tenants, tenant_entry)

__all__ = ["AUTH_HEADER", "AccessRefused", "Authenticator", "Caller", "Tenant", "TenantDirectory",
           "TenantFileError", "TenantLimiter", "TokenBucket", "hash_key", "new_key", "parse_tenants",
           "tenant_entry"]
