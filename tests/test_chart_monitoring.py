"""The chart's alerts, dashboard and autoscaling recipe use series a real server exports.

* The PrometheusRule's groups pass ``promtool check rules`` (Debian's promtool, unpacked
  into .tools by scripts/install_promtool.sh).
* Every metric named by an alert, a dashboard panel or variable, or the Prometheus-adapter
  rule in the docs appears in a real scrape of a server that served some traffic: routed
  requests with a canary and a shadow, a shadow that fails until it is paused (failed and
  dropped shadow calls), a bad request, a call without a token, and enough rows to a model
  with drift monitoring to score it. Series that exist only once something happened (a
  refusal, a dropped shadow call, a drift score) are made to happen; no name is taken on
  trust. Every label a query groups or filters by is on the series it names, so a panel
  cannot group canaries by ``version`` when the series says ``model_version``.
* The HPA's queue-time metric has one name in the chart, docs/deploy.md and
  docs/observability.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from chart import CHART, FULL_VALUES, Manifests, one, render
from conftest import ServerProcess, eventually, launch_server
from monitoring_support import reference_rows, write_monitored_repository
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from security import bearer, claims, token
from tools import PROMTOOL, ROOT, require

from tests.test_model_control import add_version, write_config

TELEMETRY_VALUES = CHART / "ci" / "telemetry-values.yaml"
DOCS = (ROOT / "docs" / "deploy.md", ROOT / "docs" / "observability.md")
METRIC_NAME = re.compile(r"\b(?:infergate|process)_[a-z_]+\b")
GROUPED_BY = re.compile(r"\bby \(([\w, ]*)\)")
MATCHED = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
# Labels Prometheus adds when it scrapes a pod through the ServiceMonitor, and a histogram's buckets.
SCRAPE_LABELS = {"namespace", "pod", "service", "job", "instance", "le"}
SECRET = "chart-monitoring-test-secret-0123456789abcdef"
SCALE_ROUTING = """\
version_policy: {all: {}}
routing:
  weights: {1: 100}
  shadow: {version: 3, fraction: 1.0, max_busy_fraction: 1.0}
  canary: {version: 2, steps: [50], step_requests: 100000}
"""
BROKEN_SHADOW = "version_policy: {all: {}}\nrouting:\n  shadow: {version: 2, fraction: 1.0, max_busy_fraction: 1.0}\n"
DRIFT_WINDOW = 128  # rows scored (min_rows defaults to the window when it is under 500)
DRIFT = f"drift: {{sample_fraction: 1.0, window: {DRIFT_WINDOW}, update_every: 1, update_interval_seconds: 0.2}}"


def _rules(manifests: Manifests) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "PrometheusRule")["spec"]
    return spec


def _dashboard(manifests: Manifests) -> dict[str, Any]:
    config_map = one(manifests, "ConfigMap", "demo-infergate-dashboard")
    dashboard: dict[str, Any] = json.loads(config_map["data"]["infergate.json"])
    return dashboard


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    panels = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return panels + [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]


def _adapter_queries() -> list[str]:
    """The seriesQuery and metricsQuery of each Prometheus-adapter rule in the docs."""
    queries = []
    for doc in DOCS:
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S):
            for part in yaml.safe_load_all(block):
                rules = (part or {}).get("rules") if isinstance(part, dict) else None
                for rule in (rules or {}).get("custom", []) if isinstance(rules, dict) else rules or []:
                    queries += [rule["seriesQuery"], rule["metricsQuery"]]
    assert queries, "no Prometheus-adapter rule found in the docs"
    return queries


def _promtool_check(groups: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups["groups"]}))
    command = [require(PROMTOOL, "install_promtool.sh"), "check", "rules", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- promtool


@pytest.mark.parametrize("values", [TELEMETRY_VALUES, FULL_VALUES], ids=["telemetry", "full"])
def test_the_alert_rules_pass_promtool(values: Path, tmp_path: Path) -> None:
    rules = _rules(render(values))
    result = _promtool_check(rules, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    assert alerts == {
        "InfergateHighErrorRate",
        "InfergateQueueTimeHigh",
        "InfergateCanaryRolledBack",
        "InfergateShadowDisagrees",
        "InfergateModelDrift",
    }


def test_promtool_does_refuse_a_broken_rule(tmp_path: Path) -> None:
    rules = _rules(render(TELEMETRY_VALUES))
    rules["groups"][0]["rules"][0]["expr"] = "sum by (model (rate(infergate_requests_total[5m]))"
    assert _promtool_check(rules, tmp_path).returncode != 0


def test_thresholds_come_from_the_values() -> None:
    rules = _rules(render(FULL_VALUES))["groups"][0]["rules"]
    error_rate = next(r for r in rules if r["alert"] == "InfergateHighErrorRate")
    assert error_rate["expr"].rstrip().endswith("> 0.005") and error_rate["for"] == "10m"
    assert 'namespace="inference", service="infergate-full-metrics"' in error_rate["expr"]  # this release's pods only
    drift = next(r for r in rules if r["alert"] == "InfergateModelDrift")
    assert drift["for"] == "15m" and 'service="infergate-full-metrics"' in drift["expr"]  # docs/monitoring.md's wait


@pytest.mark.parametrize(("alert", "fires"), [(0, False), (1, True), (2, True)])
def test_the_drift_alert_fires_on_any_positive_alert_series(alert: int, fires: bool, tmp_path: Path) -> None:
    """promtool runs the rendered rule over a pod whose infergate_drift_alert says ``alert`` for 30 minutes:
    2 is as much an alert as 1 (a --workers supervisor from before its merge took the max summed its
    workers' 1s into N, and an ``== 1`` rule went silent exactly when every worker was in alert)."""
    rules = _rules(render(FULL_VALUES))
    (drift,) = [r for group in rules["groups"] for r in group["rules"] if r["alert"] == "InfergateModelDrift"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "drift", "rules": [drift]}]}))
    labels = {"model": "m", "version": "1"}
    annotations = {
        key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], text)
        for key, text in drift["annotations"].items()
    }
    expected = [{"exp_labels": {"severity": "warning", **labels}, "exp_annotations": annotations}] if fires else []
    test = {
        "interval": "1m",
        "input_series": [
            {
                "series": 'infergate_drift_alert{namespace="inference", service="infergate-full-metrics", '
                'model="m", version="1"}',
                "values": f"{alert}x30",
            }
        ],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "InfergateModelDrift", "exp_alerts": expected}],
    }
    suite = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [test]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(suite))
    command = [require(PROMTOOL, "install_promtool.sh"), "test", "rules", "test.yaml"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    dashboard = _dashboard(render(TELEMETRY_VALUES))
    assert dashboard["uid"] == "infergate"
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert graphs and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in graphs)
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace", "model"}
    drift = next(p for p in graphs if p["title"] == "Drift: most drifting features")
    assert drift["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 0.2  # the default threshold
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- the names are real


def test_the_hpa_queue_time_metric_has_one_name_in_the_chart_and_the_docs() -> None:
    hpa = one(render(FULL_VALUES), "HorizontalPodAutoscaler")["spec"]["metrics"]
    (name,) = {m["pods"]["metric"]["name"] for m in hpa if m["type"] == "Pods"}
    series = re.compile(r"infergate_queue_(?:duration_seconds(?:_sum|_count|_bucket)?|depth)$")
    for doc in DOCS:
        queue_names = set(re.findall(r"infergate_queue_\w+", doc.read_text()))
        derived = {n for n in queue_names if not series.match(n)}  # not a series: the adapter's name
        assert derived == {name}, f"{doc.name} names the autoscaling metric {sorted(derived)}, the chart {name}"
    assert "infergate_queue_duration_seconds_sum" in " ".join(_adapter_queries())  # derived from a real series


def _repository(root: Path) -> Path:
    for version in (1, 2, 3):
        add_version(root, "scale", version)  # version N answers x * N: the shadow (3) disagrees
    write_config(root, "scale", SCALE_ROUTING)
    wrong = helper.make_graph(  # expects 5 columns: every mirrored request fails inside the runtime
        [helper.make_node("Identity", ["x"], ["y"])],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
    )
    add_version(root, "broken", 1)
    add_version(
        root,
        "broken",
        2,
        helper.make_model(wrong, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString(),
    )
    write_config(root, "broken", BROKEN_SHADOW)
    write_monitored_repository(root, DRIFT, name="monitored")  # its drift series exist only for such models
    return root


class Traffic:
    """Requests to the test server: routed ones, ones whose shadow fails, a bad one, one without a token."""

    def __init__(self, server: ServerProcess):
        self.client = tc.InferenceServerClient(server.url)
        self.x = tc.InferInput("x", [1, 4], "FP32")
        self.x.set_data_from_numpy(np.ones((1, 4), np.float32))
        self.headers = bearer(token(SECRET.encode(), "HS256", claims()))

    def send(self, model: str, count: int) -> None:
        for _ in range(count):
            self.client.infer(model, [self.x], headers=self.headers)

    def monitored(self) -> None:
        """A window of the reference distribution, so the drift monitor scores it."""
        rows = reference_rows(DRIFT_WINDOW, seed=2)
        for start in range(0, DRIFT_WINDOW, 32):
            x = tc.InferInput("x", [32, 4], "FP32")
            x.set_data_from_numpy(rows[start : start + 32])
            self.client.infer("monitored", [x], headers=self.headers)

    def refused(self) -> None:
        wrong = tc.InferInput("x", [1, 3], "FP32")
        wrong.set_data_from_numpy(np.ones((1, 3), np.float32))
        for request in ({"headers": self.headers, "inputs": [wrong]}, {"inputs": [self.x]}):
            with pytest.raises(tc.InferenceServerException):  # INVALID_ARGUMENT, then UNAUTHENTICATED
                self.client.infer("scale", **request)  # type: ignore[arg-type]


class Scrapes:
    """The largest value of each sample name seen in the server's scrapes so far, and its labels."""

    def __init__(self, url: str):
        self.url = url
        self.samples: dict[str, float] = {}
        self.labels: dict[str, set[str]] = {}

    def __call__(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url, timeout=30) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name] = max(self.samples.get(sample.name, 0.0), sample.value)
                self.labels.setdefault(sample.name, set()).update(sample.labels)
        return self.samples


def _unknown_labels(query: str, labels: dict[str, set[str]]) -> set[str]:
    """Labels ``query`` groups or filters by that none of the series it names carries."""
    used = {name.strip() for group in GROUPED_BY.findall(query) for name in group.split(",")} - {""}
    used |= set(MATCHED.findall(query))
    carried = set().union(*(labels.get(name, set()) for name in METRIC_NAME.findall(query)))
    return used - carried - SCRAPE_LABELS


async def test_every_metric_the_chart_and_docs_name_is_in_a_real_scrape(tmp_path: Path, log_dir: Path) -> None:
    manifests = render(TELEMETRY_VALUES)
    queries = [r["expr"] for g in _rules(manifests)["groups"] for r in g["rules"]]
    queries += _dashboard_queries(_dashboard(manifests)) + _adapter_queries()
    named = {name for query in queries for name in METRIC_NAME.findall(query)}

    config = tmp_path / "server.yaml"
    auth = {"enabled": True, "algorithms": ["HS256"], "secret_env": "CHART_MONITORING_SECRET"}
    config.write_text(yaml.safe_dump({"auth": {**auth, "issuer": claims()["iss"], "audience": claims()["aud"]}}))
    repository = await asyncio.to_thread(_repository, tmp_path / "models")  # profiling runs its own event loop
    server = launch_server(
        repository,
        log_dir,
        *("--config", str(config), "--metrics-port", "0", "--model-control-mode", "poll"),
        env={"CHART_MONITORING_SECRET": SECRET},
    )
    try:
        assert server.process.stdout is not None
        assert server.metrics_url is not None  # read by launch_server
        scrape = Scrapes(server.metrics_url)
        traffic = Traffic(server)
        traffic.send("scale", 10)  # canary, primary and a shadow copy each
        traffic.refused()
        traffic.monitored()

        def a_copy_was_dropped() -> bool:
            traffic.send("broken", 1)  # every copy fails; ten in a row pause the shadow and later ones are dropped
            return scrape().get("infergate_shadow_dropped_total", 0) >= 1

        await eventually(a_copy_was_dropped, "a shadow copy dropped while the failing shadow is paused")
        try:
            await eventually(lambda: named <= set(scrape()), "every named metric in the scrape")
        except AssertionError:
            raise AssertionError(f"not in a real scrape: {sorted(named - set(scrape.samples))}") from None
    finally:
        assert server.terminate() == 0, server.log()
    wrong = {query: unknown for query in queries if (unknown := _unknown_labels(query, scrape.labels))}
    assert not wrong, f"labels the series do not have: {wrong}"
    assert {
        "infergate_canary_weight_percent",
        "infergate_shadow_errors_total",
        "infergate_auth_refusals_total",
        "infergate_drift_score",
        "infergate_drift_alert",
    } <= named
