"""A gRPC channel to the session API that sends the caller's API key on every call.

    async with session_channel("127.0.0.1:50051", api_key) as channel:
        stub = SessionServiceStub(channel)

The key travels as `authorization: Bearer <key>` metadata, added by a client interceptor so it
works the same over plaintext (loopback, dev) and TLS (`tls_ca`, plus a client certificate for
mutual TLS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import grpc

__all__ = ["bearer_key", "session_channel"]


class _WithKey:
    def __init__(self, api_key: str):
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        return grpc.aio.ClientCallDetails(details.method, details.timeout, [*metadata, self._header],
                                          details.credentials, details.wait_for_ready)


class _UnaryUnary(_WithKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_WithKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_WithKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_WithKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def bearer_key(api_key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding `authorization: Bearer <key>` to every call (grpc.aio files each
    interceptor under one call kind only, hence one per kind)."""
    return [cls(api_key) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def session_channel(address: str, api_key: str, *, tls_ca: str | Path | None = None,
                    client_cert: str | Path | None = None, client_key: str | Path | None = None,
                    options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An aio channel to `address` authenticated with `api_key` (TLS when `tls_ca` is given)."""
    interceptors = bearer_key(api_key) if api_key else []
    opts = [("grpc.max_receive_message_length", 64 << 20), *options]
    if tls_ca is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None)
    return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)
