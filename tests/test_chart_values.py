"""Values of the Helm chart (helm/infergate) that decide what a pod exposes, where it may write, and
what the chart refuses rather than render something that cannot work.

* The metrics port (plain HTTP, no authentication) is on a ClusterIP Service of its own, which the
  ServiceMonitor selects, and never on the main Service (a LoadBalancer in full-values.yaml).
* ``extraVolumes`` and ``extraVolumeMounts`` give the server somewhere to write its audit trail and
  payload logs (the root filesystem is read-only), and ``tmpSizeLimit`` sizes ``/tmp``. Every file a
  ci/*.yaml pod writes is on a writable volume it mounts.
* Options that need ``metrics.enabled`` fail without it instead of rendering nothing or an HPA on a
  metric that never exists.
* ``modelConfigs`` keys are the server's model names as far as ConfigMap keys allow, except
  ``server`` (its ``server.yaml`` would be the server's config file).
* ``extraArgs`` takes numbers, and refuses the shutdown flags the grace period is computed from.
* A fraction given with ``--set`` (text to Helm) is rendered into the server config as the number it
  spells, in every float field of the server config; the server takes no quoted number.
* The image's ``docker run --read-only`` examples give the server a writable ``/tmp``.

Rendered with the real helm binary (tests/chart.py).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart import CHART, CI_VALUES, FULL_VALUES, Manifests, container, one, refused, render, server_config_map
from pydantic import BaseModel
from tools import ROOT

from infergate.config import ConfigError, ServerConfig, load_server_config
from infergate.models.config import load_model_config

TELEMETRY_VALUES = CHART / "ci" / "telemetry-values.yaml"
LOGS_VALUES = CHART / "ci" / "logs-values.yaml"


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def services(manifests: Manifests) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}


def port_names(service: dict[str, Any]) -> set[str]:
    return {p["name"] for p in service["spec"]["ports"]}


def pod_spec(manifests: Manifests) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


# --------------------------------------------------------------------------- 1. metrics Service


@pytest.mark.parametrize("values", [FULL_VALUES, TELEMETRY_VALUES], ids=["full", "telemetry"])
def test_the_metrics_port_is_on_its_own_cluster_ip_service_never_the_main_one(values: Path) -> None:
    manifests = render(values)
    found = services(manifests)
    fullname = "infergate-full" if values == FULL_VALUES else "demo-infergate"
    assert port_names(found[fullname]) == {"grpc"}  # a LoadBalancer in full-values.yaml
    assert port_names(found[f"{fullname}-headless"]) == {"grpc"}
    metrics = found[f"{fullname}-metrics"]
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]
    assert metrics["spec"]["selector"] == found[fullname]["spec"]["selector"]  # the same pods


def test_the_load_balancer_of_full_values_exposes_grpc_alone() -> None:
    exposed = [s for s in services(render(FULL_VALUES)).values() if s["spec"].get("type") == "LoadBalancer"]
    assert [port_names(s) for s in exposed] == [{"grpc"}]


def test_the_service_monitor_selects_only_the_metrics_service() -> None:
    manifests = render(FULL_VALUES)
    selector = one(manifests, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    selected = [n for n, s in services(manifests).items() if selector.items() <= s["metadata"]["labels"].items()]
    assert selected == ["infergate-full-metrics"]
    assert [e["port"] for e in one(manifests, "ServiceMonitor")["spec"]["endpoints"]] == ["metrics"]


def test_the_alerts_select_the_service_label_the_scrape_adds() -> None:
    """Prometheus labels a ServiceMonitor target with the Service's name: the metrics Service's."""
    rules = one(render(FULL_VALUES), "PrometheusRule")["spec"]["groups"][0]["rules"]
    for rule in rules:
        assert 'service="infergate-full-metrics"' in rule["expr"], rule["alert"]


def test_without_metrics_there_is_no_metrics_service() -> None:
    assert set(services(render())) == {"demo-infergate", "demo-infergate-headless"}


# --------------------------------------------------------------------------- 2. volumes


def test_extra_volumes_and_mounts_reach_the_pod_and_its_server_container(tmp_path: Path) -> None:
    values = {
        "extraVolumes": [{"name": "logs", "persistentVolumeClaim": {"claimName": "infergate-logs"}}],
        "extraVolumeMounts": [{"name": "logs", "mountPath": "/var/log/infergate", "subPathExpr": "$(POD_NAME)"}],
    }
    manifests = render(values_file(tmp_path, values))
    assert values["extraVolumes"][0] in pod_spec(manifests)["volumes"]
    assert values["extraVolumeMounts"][0] in container(manifests)["volumeMounts"]
    init = pod_spec(manifests)["initContainers"][0]
    assert all(m["name"] != "logs" for m in init["volumeMounts"])  # the server's, not the model sync's


def test_the_tmp_size_limit_is_a_value() -> None:
    def tmp(*sets: str) -> dict[str, Any]:
        volumes = {v["name"]: v for v in pod_spec(render(None, *sets))["volumes"]}
        return dict(volumes["tmp"])

    assert tmp() == {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}
    assert tmp("tmpSizeLimit=2Gi") == {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"extraVolumes": ["logs"]}, "extraVolumes"),
        ({"extraVolumes": [{"emptyDir": {}}]}, "name"),
        ({"extraVolumeMounts": [{"name": "logs"}]}, "mountPath"),
        ({"extraVolumeMounts": {"name": "logs", "mountPath": "/x"}}, "extraVolumeMounts"),
        ({"tmpSizeLimit": "lots"}, "tmpSizeLimit"),
    ],
)
def test_the_schema_refuses_bad_volume_values(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    assert message in refused(values_file(tmp_path, values))


def _written_paths(manifests: Manifests) -> list[str]:
    """The files the server writes: the audit trail and each model's payload log."""
    configs = server_config_map(manifests)
    paths = [yaml.safe_load(configs["server.yaml"]).get("audit_log")]
    for key, text in configs.items():
        if key != "server.yaml":
            paths.append(((yaml.safe_load(text) or {}).get("monitoring") or {}).get("payload_log", {}).get("path"))
    return [p for p in paths if p]


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_every_file_the_server_writes_is_on_a_writable_volume(values: Path) -> None:
    manifests = render(values)
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    writable = [
        m["mountPath"]
        for m in container(manifests)["volumeMounts"]
        if not m.get("readOnly") and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]])
    ]
    for path in _written_paths(manifests):
        assert any(path.startswith(mount.rstrip("/") + "/") for mount in writable), f"{path}: on no writable volume"
        assert not path.startswith(("/models/", "/tmp/")), path  # the repository, and scratch space


def test_the_logs_example_writes_the_audit_trail_and_a_payload_log() -> None:
    """ci/logs-values.yaml: test_chart_runs.py starts it, so the server opens both files there."""
    written = _written_paths(render(LOGS_VALUES))
    assert len(written) == 2 and all(p.startswith("/var/log/infergate/") for p in written)


def test_the_documented_audit_log_recipe_renders(tmp_path: Path) -> None:
    """The reviewer's setting, with the volume docs/deploy.md adds for it."""
    bare = values_file(tmp_path, {"serverConfig": {"audit_log": "/var/log/infergate/audit.jsonl"}})
    assert _written_paths(render(bare)) == ["/var/log/infergate/audit.jsonl"]
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    recipes = [yaml.safe_load(b) for b in blocks if "audit_log" in b and "extraVolumeMounts" in b]
    assert recipes, "docs/deploy.md shows no audit_log on a volume"
    for recipe in recipes:
        test_path = values_file(tmp_path, recipe)
        manifests = render(test_path)
        mounts = {m["mountPath"] for m in container(manifests)["volumeMounts"]}
        for path in _written_paths(manifests):
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), path


# --------------------------------------------------------------------------- 3. options that need metrics


@pytest.mark.parametrize(
    ("sets", "names"),
    [
        (("autoscaling.enabled=true", "autoscaling.queueTime.enabled=true"), "autoscaling.queueTime.enabled"),
        (("metrics.serviceMonitor.enabled=true",), "metrics.serviceMonitor.enabled"),
        (("metrics.prometheusRule.enabled=true",), "metrics.prometheusRule.enabled"),
        (("metrics.grafanaDashboard.enabled=true",), "metrics.grafanaDashboard.enabled"),
    ],
)
def test_options_that_need_metrics_fail_without_them(sets: tuple[str, ...], names: str) -> None:
    error = refused(None, *sets)
    assert names in error and "metrics.enabled=true" in error


def test_queue_time_autoscaling_with_metrics_renders_its_pods_metric() -> None:
    sets = ("autoscaling.enabled=true", "autoscaling.queueTime.enabled=true", "metrics.enabled=true")
    metrics = one(render(None, *sets), "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]


# --------------------------------------------------------------------------- 4. model config names


@pytest.mark.parametrize("name", ["multi_io", "identity_all", "ResNet50", "resnet50.v2", "a", "x" * 248])
def test_model_configs_take_the_servers_model_names(name: str, tmp_path: Path) -> None:
    manifests = render(values_file(tmp_path, {"modelConfigs": {name: {"max_batch_size": 8}}}))
    assert yaml.safe_load(server_config_map(manifests)[f"{name}.yaml"]) == {"max_batch_size": 8}
    mount = {"name": "config", "mountPath": f"/models/{name}/config.yaml", "subPath": f"{name}.yaml", "readOnly": True}
    assert mount in container(manifests)["volumeMounts"]


@pytest.mark.parametrize(
    "name",
    [
        "server",  # server.yaml is the server's config file
        ".hidden",  # not a model name: the server skips hidden directories
        "..",
        "a/b",  # a path, not a directory right under /models
        "a b",  # not a ConfigMap key
        "x" * 249,  # x...x.yaml is longer than a ConfigMap key may be
        "",
    ],
)
def test_model_config_names_that_are_no_model_or_no_config_map_key_are_refused(name: str, tmp_path: Path) -> None:
    error = refused(values_file(tmp_path, {"modelConfigs": {name: {"max_batch_size": 8}}}))
    assert "modelConfigs" in error


def test_a_model_named_server_cannot_replace_the_server_config(tmp_path: Path) -> None:
    error = refused(values_file(tmp_path, {"modelConfigs": {"server": {"max_batch_size": 8}}}))
    assert "modelConfigs.server" in error and "server.yaml, the server's config file" in error


# --------------------------------------------------------------------------- 5. extraArgs


def test_extra_args_may_be_numbers_and_reach_the_server_as_strings(tmp_path: Path) -> None:
    values = values_file(tmp_path, {"extraArgs": ["--repository-poll-secs", 30, "--log-level", "debug"]})
    args = container(render(values))["args"]
    assert args[-4:] == ["--repository-poll-secs", "30", "--log-level", "debug"]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--shutdown-grace-seconds", 60], "serverConfig.shutdown_grace_seconds"),
        (["--shutdown-grace-seconds=60"], "serverConfig.shutdown_grace_seconds"),
        (["--shutdown-grace", "60"], "serverConfig.shutdown_grace_seconds"),  # argparse takes a prefix
        (["--shutdown-delay-seconds", "5"], "serverConfig.shutdown_delay_seconds"),
    ],
)
def test_extra_args_refuse_the_shutdown_flags_the_grace_period_is_computed_from(
    args: list[Any], key: str, tmp_path: Path
) -> None:
    error = refused(values_file(tmp_path, {"extraArgs": args}))
    assert key in error and "extraArgs" in error


@pytest.mark.parametrize("item", [{"a": 1}, ["--x"], True])
def test_extra_args_are_strings_or_numbers(item: Any, tmp_path: Path) -> None:
    assert "extraArgs" in refused(values_file(tmp_path, {"extraArgs": [item]}))


# --------------------------------------------------------------------------- 6. the image's examples


@pytest.mark.parametrize("doc", ["Dockerfile", "docs/deploy.md"])
def test_read_only_docker_examples_give_the_server_a_writable_tmp(doc: str) -> None:
    """Without one the server has no usable temporary directory (--workers 2 then dies at start)."""
    runs = [line for line in (ROOT / doc).read_text().splitlines() if "docker run" in line and "--read-only" in line]
    assert runs, f"{doc} has no read-only docker run example"
    for line in runs:
        assert "--tmpfs /tmp" in line, line


def test_the_listen_address_is_a_value_for_ipv6_clusters() -> None:
    """0.0.0.0 by default; "::" on a cluster whose pods have IPv6 addresses only (the server brackets it)."""

    def listening(*sets: str) -> tuple[str, str]:
        server = yaml.safe_load(server_config_map(render(None, "metrics.enabled=true", *sets))["server.yaml"])
        return server["host"], server["telemetry"]["metrics_host"]

    assert listening() == ("0.0.0.0", "0.0.0.0")
    assert listening("listenAddress=::") == ("::", "::")
    assert "listenAddress" in refused(None, "listenAddress=")


# --------------------------------------------------------------------------- 7. numbers in the server config


def float_fields(model: type[BaseModel], parent: tuple[str, ...] = ()) -> list[str]:
    """The dotted paths of ``model``'s float fields, in nested models too (what --set may give as a fraction)."""
    paths: list[str] = []
    for name, field in model.model_fields.items():
        kinds = [kind for kind in (typing.get_args(field.annotation) or [field.annotation]) if kind is not type(None)]
        kinds = [typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind for kind in kinds]
        if float in kinds:
            paths.append(".".join((*parent, name)))
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                paths += float_fields(kind, (*parent, name))
    return paths


def dig(data: Any, path: str) -> Any:
    for key in path.split("."):
        data = data[key]
    return data


def test_every_float_of_the_server_config_given_with_set_renders_as_a_number() -> None:
    """Helm's --set keeps a fraction as text ("0.5"); the server takes no quoted number, so the chart
    renders it as the number it spells, in every float field the server config has."""
    paths = float_fields(ServerConfig)
    assert "telemetry.sample_ratio" in paths and "auth.jwks.refresh_seconds" in paths
    manifests = render(None, *(f"serverConfig.{path}=0.5" for path in paths))
    server = yaml.safe_load(server_config_map(manifests)["server.yaml"])
    assert {path: dig(server, path) for path in paths} == dict.fromkeys(paths, 0.5)


def test_the_rendered_numbers_load_and_text_that_is_no_number_stays_text_for_the_server_to_refuse(
    tmp_path: Path,
) -> None:
    def server_file(*sets: str) -> Path:
        path = tmp_path / "server.yaml"
        path.write_text(server_config_map(render(None, *sets))["server.yaml"], encoding="utf-8")
        return path

    given = server_file(
        "serverConfig.telemetry.sample_ratio=.25", "serverConfig.shutdown_grace_seconds=7.5",
        "serverConfig.repository_poll_seconds=1e1", "serverConfig.connections.max_age_seconds=0300",
    )  # fmt: skip
    config = load_server_config(given, {})
    assert (config.telemetry.sample_ratio, config.shutdown_grace_seconds, config.repository_poll_seconds) == (
        0.25, 7.5, 10.0,
    )  # fmt: skip
    assert config.connections.max_age_seconds == 300.0
    half = server_file("serverConfig.telemetry.sample_ratio=half")
    with pytest.raises(ConfigError, match=r"telemetry\.sample_ratio: Input should be a valid number"):
        load_server_config(half, {})
    too_large = server_file("serverConfig.telemetry.sample_ratio=1e400")  # no float holds it: not made 0
    with pytest.raises(ConfigError, match=r"telemetry\.sample_ratio: Input should be a valid number"):
        load_server_config(too_large, {})
    assert "Does not match pattern" in refused(None, "serverConfig.shutdown_grace_seconds=half")


def test_the_grace_period_counts_a_shutdown_time_given_with_set_as_a_fraction() -> None:
    manifests = render(None, "serverConfig.shutdown_grace_seconds=7.5")
    sleep = int(container(manifests)["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = one(manifests, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == sleep + 10 + 15  # ceil(shutdown_delay_seconds 2 + 7.5), and 15 s to exit


def test_a_float_helm_writes_in_exponent_form_loads_as_a_float(tmp_path: Path) -> None:
    """toYaml writes 0.00001 as 1e-05, which PyYAML alone would read as text."""
    values = values_file(
        tmp_path,
        {
            "serverConfig": {"telemetry": {"sample_ratio": 0.00001}},
            "modelConfigs": {"mlp": {"routing": {"shadow": {"version": 2, "fraction": 0.00001}}}},
        },
    )
    files = server_config_map(render(values))
    assert "sample_ratio: 1e-05" in files["server.yaml"] and "fraction: 1e-05" in files["mlp.yaml"]
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert load_server_config(tmp_path / "server.yaml", {}).telemetry.sample_ratio == 0.00001
    routing = load_model_config(tmp_path / "mlp.yaml").routing
    assert routing is not None and routing.shadow is not None and routing.shadow.fraction == 0.00001
