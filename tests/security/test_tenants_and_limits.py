"""Tenants file parsing and hot reload, API key checks, token buckets, `livestage tenant add`."""

from __future__ import annotations

import os

import pytest
import yaml

from livestage.cli import main as cli_main
from livestage.security import AccessRefused, Authenticator, TenantDirectory, TenantFileError, TokenBucket
from livestage.security.tenants import hash_key, new_key, parse_tenants, tenant_entry


def write(path, entries) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"tenants": entries}))
    os.replace(tmp, path)  # as kubelet swaps a Secret's files: a new inode


def md(key: str | None = None, raw: str | None = None) -> list[tuple[str, str]]:
    if raw is not None:
        return [("authorization", raw)]
    return [("authorization", f"Bearer {key}")] if key else []


@pytest.mark.parametrize("entry, where", [
    ({"id": "Acme", "key_sha256": "0" * 64}, "tenants[0].id"),
    ({"id": "acme", "key_sha256": "xyz"}, "tenants[0].key_sha256"),
    ({"id": "acme", "key_sha256": "0" * 64, "max_sessions": 0}, "tenants[0].max_sessions"),
    ({"id": "acme", "key_sha256": "0" * 64, "max_sessions": "4"}, "tenants[0].max_sessions"),
    ({"id": "acme", "key_sha256": "0" * 64, "calls_per_second": -1}, "tenants[0].calls_per_second"),
    ({"id": "acme", "key_sha256": "0" * 64, "admin": True}, "unknown field 'admin'"),
])
def test_a_malformed_tenant_entry_is_refused_naming_the_field(entry, where):
    with pytest.raises(TenantFileError) as err:
        parse_tenants(yaml.safe_dump({"tenants": [entry]}))
    assert where in str(err.value)


def test_two_tenants_cannot_share_a_key_or_an_id():
    d = "a" * 64
    with pytest.raises(TenantFileError, match="also tenant 'one'"):
        parse_tenants(yaml.safe_dump({"tenants": [{"id": "one", "key_sha256": d}, {"id": "two", "key_sha256": d}]}))
    with pytest.raises(TenantFileError, match="duplicate tenant"):
        parse_tenants(yaml.safe_dump({"tenants": [{"id": "one", "key_sha256": d}, {"id": "one", "key_sha256": "b" * 64}]}))


def test_keys_are_rotated_by_rewriting_the_file_without_a_restart(tmp_path):
    path = tmp_path / "tenants.yaml"
    old, new = new_key(), new_key()
    write(path, [tenant_entry("acme", old)])
    directory = TenantDirectory(path, check_interval_s=0.0)
    assert directory.lookup(old).id == "acme" and directory.lookup(new) is None
    # rotation: both keys valid while clients move over, then only the new one
    write(path, [{**tenant_entry("acme", old), "key_sha256": [hash_key(old), hash_key(new)]}])
    assert directory.lookup(new).id == "acme" and directory.lookup(old).id == "acme"
    write(path, [tenant_entry("acme", new)])
    assert directory.lookup(old) is None and directory.lookup(new).id == "acme"
    assert directory.reloads == 2


def test_a_broken_rewrite_keeps_the_last_good_tenants_and_reports_why(tmp_path):
    path = tmp_path / "tenants.yaml"
    key = new_key()
    write(path, [tenant_entry("acme", key)])
    errors: list[str] = []
    directory = TenantDirectory(path, check_interval_s=0.0, on_reload_error=errors.append)
    path.write_text("tenants: [ {id: acme, key_sha256: nope ")
    assert directory.lookup(key).id == "acme"
    assert errors and str(path) in errors[0] and "not valid YAML" in errors[0]


def test_a_missing_tenants_file_stops_the_start_with_its_path(tmp_path):
    with pytest.raises(TenantFileError, match="cannot read the tenants file"):
        TenantDirectory(tmp_path / "absent.yaml")


@pytest.mark.parametrize("metadata, problem", [
    ([], "missing"),
    (md(raw="Basic dXNlcjpwYXNz"), "expected `Bearer <api key>`"),
    (md(raw="Bearer "), "expected `Bearer <api key>`"),
    (md(raw="Bearer not-a-key"), "malformed API key"),
    (md("lsk_" + "A" * 43), "unknown API key"),
    (md("lsk_" + "A" * 43) * 2, "more than once"),
])
def test_calls_without_a_valid_key_are_refused_naming_the_header(tmp_path, metadata, problem):
    path = tmp_path / "tenants.yaml"
    write(path, [tenant_entry("acme", new_key())])
    with pytest.raises(AccessRefused) as err:
        Authenticator(TenantDirectory(path)).authenticate(metadata)
    assert err.value.code == "unauthenticated"
    assert err.value.message.startswith("authorization:") and problem in err.value.message


def test_each_tenant_has_its_own_call_budget(tmp_path):
    path = tmp_path / "tenants.yaml"
    busy, quiet = new_key(), new_key()
    write(path, [{**tenant_entry("busy", busy), "calls_per_second": 0.01, "call_burst": 3},
                 {**tenant_entry("quiet", quiet), "calls_per_second": 0.01, "call_burst": 3}])
    auth = Authenticator(TenantDirectory(path))
    for _ in range(3):
        assert auth.authenticate(md(busy)).tenant_id == "busy"
    with pytest.raises(AccessRefused) as err:
        auth.authenticate(md(busy))
    assert err.value.code == "resource_exhausted" and "'busy'" in err.value.message
    assert auth.authenticate(md(quiet)).tenant_id == "quiet"  # the other tenant is untouched


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2.0, burst=4.0, stamp=100.0)
    assert all(bucket.take(1.0, now=100.0) for _ in range(4))
    assert not bucket.take(1.0, now=100.0)
    assert bucket.take(1.0, now=100.5) and not bucket.take(1.0, now=100.5)  # 0.5 s -> 1 token
    assert bucket.take(4.0, now=200.0) and not bucket.take(0.5, now=200.0)  # capped at the burst
    assert not bucket.take(5.0, now=300.0)  # more than the burst never fits


def test_tenant_add_prints_a_key_whose_digest_it_stores(tmp_path, capsys):
    path = tmp_path / "tenants.yaml"
    assert cli_main(["tenant", "add", "acme", "--file", str(path), "--max-sessions", "2"]) == 0
    out = capsys.readouterr().out
    key = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("key: "))
    assert key not in path.read_text()  # only the digest is kept
    tenant = TenantDirectory(path).lookup(key)
    assert tenant is not None and tenant.id == "acme" and tenant.max_sessions == 2
    assert cli_main(["tenant", "add", "acme", "--file", str(path)]) == 2  # no second acme
    assert cli_main(["tenant", "add", "Not_Valid"]) == 2
    assert "must match" in capsys.readouterr().err
