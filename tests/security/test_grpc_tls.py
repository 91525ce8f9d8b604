"""Mutual TLS on a service's gRPC port (`LIVESTAGE_GRPC_TLS_*`): a real server and real clients."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from livestage.client import session_channel
from livestage.config import SettingsError, load_settings
from livestage.serving.process import grpc_server_credentials


def _cert(name: str, issuer_key, issuer_name, key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


@pytest.fixture
def pki(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "livestage test CA")])
    ca = _cert("livestage test CA", ca_key, ca_name, ca_key, ca=True)
    files = {"ca": _write(tmp_path / "ca.pem", cert=ca)}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[who] = _write(tmp_path / f"{who}.pem", cert=_cert(who, ca_key, ca_name, key, server=who == "server"))
        files[f"{who}_key"] = _write(tmp_path / f"{who}.key", key=key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")])
    files["stranger"] = _write(tmp_path / "stranger.pem", cert=_cert("stranger", other_key, other_ca, other_key))
    files["stranger_key"] = _write(tmp_path / "stranger.key", key=other_key)
    return files


async def _check(address: str, **tls) -> int:
    async with session_channel(address, "", **tls) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return resp.status


async def test_mutual_tls_serves_only_clients_with_a_certificate_from_the_client_ca(pki):
    settings = load_settings(grpc_tls_cert=pki["server"], grpc_tls_key=pki["server_key"],
                             grpc_tls_client_ca=pki["ca"])
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(settings))
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        assert await _check(address, tls_ca=pki["ca"], client_cert=pki["client"],
                            client_key=pki["client_key"]) == health_pb2.HealthCheckResponse.SERVING
        for refused in ({"tls_ca": pki["ca"]},  # no client certificate
                        {"tls_ca": pki["ca"], "client_cert": pki["stranger"], "client_key": pki["stranger_key"]},
                        {}):  # plaintext
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _check(address, **refused)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_tls_settings_that_do_not_fit_together_stop_the_start_naming_them(pki):
    with pytest.raises(SettingsError) as err:
        load_settings(grpc_tls_cert=pki["server"])
    assert "LIVESTAGE_GRPC_TLS_KEY" in str(err.value)
    with pytest.raises(SettingsError) as err:
        load_settings(grpc_tls_client_ca=pki["ca"])
    assert "LIVESTAGE_GRPC_TLS_CERT" in str(err.value)
