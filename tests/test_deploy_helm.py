"""The Helm chart (helm/infergate) renders manifests Kubernetes accepts and the server agrees with.

Checked offline: ``helm lint --strict``, ``helm template`` for the default values and for
every file in ci/ (full-values.yaml switches every option on; the others one feature each),
the rendered manifests against Kubernetes 1.30's schemas (kubernetes-validate --strict),
values.schema.json refusing bad values, and the contracts between chart and server: probes
ask the health services the server reports, on the plaintext health port,
metrics listen where Prometheus can scrape, the grace period outlasts the drain, the
rendered server.yaml loads with infergate's own validator. test_chart_runs.py goes further
and starts a server from each rendered pod spec. ``make test`` installs helm
(scripts/install_helm.sh).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chart import CHART, CI_VALUES, FULL_VALUES, Manifests, container, helm, one, refused, render, server_config_map

from infergate.config import ServerConfig, load_server_config
from infergate.server import HEALTH_SERVICES, SERVICE_NAME

KUBERNETES_VERSION = "1.30.0"
BUILT_IN = {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert found, "kubernetes-validate is missing: it comes with the dev extra"
    command = [found, "-k", KUBERNETES_VERSION, "--strict", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def validate_built_in(manifests: Manifests, tmp_path: Path) -> None:
    """Every built-in kind against Kubernetes' schemas (CRDs like ServiceMonitor have none there)."""
    built_in = [m for m in manifests if m["kind"] in BUILT_IN]
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(built_in))
    result = kubernetes_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(built_in), result.stdout


def server_yaml(manifests: Manifests, tmp_path: Path) -> ServerConfig:
    path = tmp_path / "server.yaml"
    path.write_text(server_config_map(manifests)["server.yaml"])
    return load_server_config(path, {})


# --------------------------------------------------------------------------- lint and validate


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=["default", *(v.stem for v in CI_VALUES)])
def test_the_chart_passes_helm_lint_strict(values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_values_render_a_valid_deployment_services_config_and_budget(tmp_path: Path) -> None:
    manifests = render()
    assert sorted(m["kind"] for m in manifests) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceAccount",
    ]
    validate_built_in(manifests, tmp_path)


def test_full_values_render_every_option_and_kubernetes_accepts_them(tmp_path: Path) -> None:
    manifests = render(FULL_VALUES)
    kinds = {m["kind"] for m in manifests}
    assert kinds == BUILT_IN | {"ServiceMonitor", "PrometheusRule"}
    validate_built_in(manifests, tmp_path)


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_every_ci_values_file_renders_manifests_kubernetes_accepts(values: Path, tmp_path: Path) -> None:
    validate_built_in(render(values), tmp_path)


def test_kubernetes_validate_does_reject_a_bad_manifest(tmp_path: Path) -> None:
    deployment = one(render(), "Deployment")
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    assert kubernetes_validate(path).returncode != 0


def test_the_service_monitor_scrapes_a_service_port_named_metrics() -> None:
    manifests = render(FULL_VALUES)
    monitor = one(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [m for m in manifests if m["kind"] == "Service"]
    scraped = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    ports = {p["name"] for s in scraped for p in s["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in ports


# --------------------------------------------------------------------------- chart and server agree


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=["default", *(v.stem for v in CI_VALUES)])
def test_readiness_is_strict_while_startup_and_liveness_ask_whether_the_server_answers(values: Path | None) -> None:
    """ "" is the whole server, ready once every model loaded; the inference service is SERVING once
    loading is over, broken models or not. A broken model must block the rollout, not restart the pod."""
    assert HEALTH_SERVICES == ("", SERVICE_NAME)  # what the server reports
    probes = container(render(values))
    assert probes["readinessProbe"]["grpc"]["service"] == ""
    assert probes["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # room for model loading


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=["default", *(v.stem for v in CI_VALUES)])
def test_pods_get_longer_than_the_prestop_sleep_plus_the_servers_delay_and_drain(values: Path | None) -> None:
    manifests = render(values)
    server = yaml.safe_load(server_config_map(manifests)["server.yaml"])
    drain = server.get("shutdown_delay_seconds", 0) + server["shutdown_grace_seconds"]
    sleep = int(container(manifests)["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = one(manifests, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > sleep + drain


def test_the_rendered_server_config_loads_with_the_servers_own_validator(tmp_path: Path) -> None:
    manifests = render(None, "serverConfig.shutdown_grace_seconds=20", "serverConfig.strict_readiness=false")
    config = server_yaml(manifests, tmp_path)
    assert (config.host, config.port, str(config.model_repository)) == ("0.0.0.0", 8001, "/models")
    assert (config.shutdown_grace_seconds, config.strict_readiness) == (20, False)
    assert config.shutdown_delay_seconds == 2  # the chart's default
    assert container(manifests)["args"][:2] == ["--config", "/etc/infergate/server.yaml"]


TLS = (
    "serverConfig.tls.cert_file=/etc/infergate/tls/tls.crt",
    "serverConfig.tls.key_file=/etc/infergate/tls/tls.key",
    "tls.secretName=server-tls",
)


@pytest.mark.parametrize(
    ("values", "sets"),
    [(None, ()), (None, TLS), *((v, ()) for v in CI_VALUES)],
    ids=["default", "tls-set", *(v.stem for v in CI_VALUES)],
)
def test_every_probe_asks_the_plaintext_health_port_on_the_pod_ip(
    values: Path | None, sets: tuple[str, ...], tmp_path: Path
) -> None:
    """With or without TLS: on the serving port, probes would share gRPC's pending-call backlog
    (limits.max_pending_calls) with every call, and a spike would fail them and empty the Service."""
    manifests = render(values, *sets)
    server = container(manifests)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 8003, probe
    assert {"name": "health", "containerPort": 8003, "protocol": "TCP"} in server["ports"]
    args = server["args"]
    assert args[args.index("--health-host") + 1] == "$(POD_IP)"
    (pod_ip,) = [e for e in server["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    config = yaml.safe_load(server_config_map(manifests)["server.yaml"])
    assert config["health_port"] == 8003 and config["port"] == 8001
    loaded = server_yaml(manifests, tmp_path)  # keys the server knows, a port --workers can share
    assert loaded.health_port == 8003 and loaded.health_port != loaded.port
    services = [m for m in manifests if m["kind"] == "Service"]
    assert all(p["name"] != "health" for s in services for p in s["spec"]["ports"])  # only the kubelet needs it
    if sets:
        assert config["tls"]["cert_file"] == "/etc/infergate/tls/tls.crt"


def test_the_health_port_follows_probes_health_port(tmp_path: Path) -> None:
    manifests = render(None, "probes.healthPort=8080")
    server = container(manifests)
    assert {server[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {8080}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in server["ports"]
    assert server_yaml(manifests, tmp_path).health_port == 8080


@pytest.mark.parametrize(
    ("sets", "port"),
    [
        (("probes.healthPort=8001",), "service.port"),
        (("metrics.enabled=true", "probes.healthPort=9464"), "metrics.port"),
    ],
    ids=["serving-port", "metrics-port"],
)
def test_the_health_port_must_be_a_port_of_its_own(sets: tuple[str, ...], port: str) -> None:
    error = refused(None, *sets)
    assert "probes.healthPort" in error and port in error


def test_with_metrics_on_the_server_listens_for_scrapes_on_every_address(tmp_path: Path) -> None:
    manifests = render(None, "metrics.enabled=true", "serverConfig.telemetry.sample_ratio=0.5")
    config = server_yaml(manifests, tmp_path)
    assert config.telemetry.metrics_host == "0.0.0.0"
    assert config.telemetry.sample_ratio == 0.5  # the user's telemetry keys are kept
    args = container(manifests)["args"]
    assert args[args.index("--metrics-port") + 1] == "9464"
    assert "telemetry" not in yaml.safe_load(server_config_map(render())["server.yaml"])


def test_extra_environment_reaches_the_server_container() -> None:
    env = container(render(None, "env[0].name=OTEL_SERVICE_NAME", "env[0].value=fraud"))["env"]
    assert [e["name"] for e in env] == ["POD_IP", "OTEL_SERVICE_NAME"]  # the health port's address, then yours
    assert env[1] == {"name": "OTEL_SERVICE_NAME", "value": "fraud"}


def test_pods_run_non_root_with_a_read_only_root_filesystem_and_no_capabilities() -> None:
    manifests = render()
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the one writable place


def test_rolling_updates_add_a_pod_before_removing_one() -> None:
    strategy = one(render(), "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


# --------------------------------------------------------------------------- options


def test_a_model_repository_claim_is_mounted_read_only_without_an_init_container(tmp_path: Path) -> None:
    sets = ("modelRepository.source=persistentVolumeClaim", "modelRepository.persistentVolumeClaim.claimName=models")
    manifests = render(None, *sets)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    validate_built_in(manifests, tmp_path)


def test_model_configs_are_mounted_where_the_repository_expects_them() -> None:
    manifests = render(FULL_VALUES)
    configs = server_config_map(manifests)
    assert yaml.safe_load(configs["mlp.yaml"])["max_batch_size"] == 64
    mount = {"name": "config", "mountPath": "/models/mlp/config.yaml", "subPath": "mlp.yaml", "readOnly": True}
    assert mount in container(manifests)["volumeMounts"]


def test_a_config_change_changes_the_pod_template_so_pods_roll() -> None:
    def checksum(*sets: str) -> str:
        annotations = one(render(None, *sets), "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    assert checksum() != checksum("serverConfig.log_level=debug")


def test_secrets_for_jwt_keys_and_tls_are_mounted_read_only() -> None:
    manifests = render(None, "auth.secretName=jwt-keys", "tls.secretName=server-tls")
    mounts = {m["name"]: m for m in container(manifests)["volumeMounts"]}
    assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/infergate/auth", "readOnly": True}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/infergate/tls", "readOnly": True}
    volumes = {v["name"]: v for v in one(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"] == {"secretName": "jwt-keys"}
    assert volumes["tls"]["secret"] == {"secretName": "server-tls"}


def test_gpus_are_requested_as_an_extended_resource_limit() -> None:
    limits = container(render(None, "gpu.count=2"))["resources"]["limits"]
    assert limits == {"memory": "2Gi", "nvidia.com/gpu": 2}
    assert "nvidia.com/gpu" not in container(render())["resources"]["limits"]


def test_autoscaling_owns_the_replica_count_and_scales_on_cpu_and_queue_time() -> None:
    manifests = render(FULL_VALUES)
    assert "replicas" not in one(manifests, "Deployment")["spec"]
    metrics = one(manifests, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metrics[0]["resource"]["name"] == "cpu"
    assert metrics[1]["pods"]["metric"]["name"] == "infergate_queue_duration_seconds_mean"
    assert "HorizontalPodAutoscaler" not in {m["kind"] for m in render()}


def test_the_headless_service_lists_pods_for_client_side_balancing() -> None:
    headless = one(render(), "Service", "demo-infergate-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][0]["name"] == "grpc"
    services = [m for m in render(None, "headlessService.enabled=false") if m["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == ["demo-infergate"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("replicaCount=-1", "replicaCount"),
        ("unknownValue=1", "unknownValue"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("service.port=70000", "service.port"),
        ("serverConfig.port=9000", "serverConfig"),  # the chart owns host, port and model_repository
        ("serverConfig.health_port=9000", "serverConfig"),  # and the health port
        ("metrics.prometheusRule.errorRatio=2", "errorRatio"),
        ("serverConfig.log_level=loud", "log_level"),
        ("modelRepository.source=s3", "source"),
        ("probes.liveness.periodSeconds=0", "periodSeconds"),
        ("probes.readiness.service=inference.GRPCInferenceServic", "service"),  # one the server does not report
        ("autoscaling.targetCPUUtilizationPercentage=150", "targetCPUUtilizationPercentage"),
        ("resources.limits.memory=lots", "memory"),
        ("modelConfigs.bad name.max_batch_size=1", "bad name"),  # not a ConfigMap key
    ],
)
def test_the_values_schema_refuses_bad_values(setting: str, message: str) -> None:
    assert message in refused(None, setting)


def test_model_configs_cannot_be_mounted_into_a_read_only_claim() -> None:
    error = refused(
        FULL_VALUES,
        "modelRepository.source=persistentVolumeClaim",
        "modelRepository.persistentVolumeClaim.claimName=models",
    )
    assert "modelConfigs needs an emptyDir model repository" in error


def test_a_claim_source_needs_a_claim_name() -> None:
    assert "claimName is required" in refused(None, "modelRepository.source=persistentVolumeClaim")
